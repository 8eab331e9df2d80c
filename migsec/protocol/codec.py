"""Canonical JSON and strict field readers shared by every message decoder.

Decoders never trust the shape of what arrived: every field is looked up,
type-checked and bounded here, and anything unexpected (unknown keys, duplicate
keys, NaN, wrong types, oversized strings) raises MalformedMessageError.
"""
from __future__ import annotations

import binascii
import json
import re
from typing import Any, Iterable, Mapping

from migsec.canonical import canonical_json as _canonical_json
from migsec.canonical import no_constant, no_duplicates
from migsec.errors import MalformedMessageError

VERSION = 1
MAX_JSON_BYTES = 256 * 1024  # control messages are small; a bound keeps parsing cheap
MAX_STRING = 4096
MAX_EPOCH = 2**37  # seconds; year ~6300, well inside datetime's range
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+\-]{0,254}$")
_B64URL_RE = re.compile(r"[A-Za-z0-9_\-]*")
# base64url <-> base64 alphabets, for binascii directly (base64.urlsafe_* wrap the same calls
# in several layers of type checks that cost more than the conversion on short fields)
_TO_URL = bytes.maketrans(b"+/", b"-_")
_FROM_URL = bytes.maketrans(b"-_", b"+/")


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON object that digests and signatures are taken over."""
    try:
        return _canonical_json(obj)
    except (TypeError, ValueError) as exc:
        raise MalformedMessageError(f"value cannot be encoded as canonical JSON: {exc}") from exc


def _no_float(text: str) -> Any:
    raise MalformedMessageError(f"JSON number {text[:20]!r} is not an integer")


# One decoder for every call: json.loads with hooks builds a new JSONDecoder each time.
_DECODER = json.JSONDecoder(object_pairs_hook=no_duplicates, parse_constant=no_constant,
                            parse_float=_no_float)


def parse_json_object(data: bytes | bytearray | memoryview | str, what: str) -> dict[str, Any]:
    """Parse a JSON object strictly (no duplicates, no floats, no NaN, bounded size)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    data = bytes(data)
    if len(data) > MAX_JSON_BYTES:
        raise MalformedMessageError(f"{what}: {len(data)} bytes of JSON exceed {MAX_JSON_BYTES}")
    try:
        text = data.decode("utf-8")
        obj = _DECODER.decode(text)
    except MalformedMessageError as exc:
        raise MalformedMessageError(f"{what}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedMessageError(f"{what}: not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(obj, dict):
        raise MalformedMessageError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def b64e(data: bytes) -> str:
    """base64url without padding (the JOSE form)."""
    return binascii.b2a_base64(data, newline=False).translate(_TO_URL).rstrip(b"=").decode("ascii")


def _b64url_bytes(text: str) -> bytes | None:
    """The decoded bytes, or None when ``text`` (a str) is not base64url."""
    if _B64URL_RE.fullmatch(text) is None:
        return None
    try:
        # the pattern above admits only ASCII, so encode() cannot fail
        return binascii.a2b_base64(text.encode("ascii").translate(_FROM_URL) + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def b64d(text: str, what: str) -> bytes:
    value = _b64url_bytes(text) if isinstance(text, str) else None
    if value is None:
        raise MalformedMessageError(f"{what} is not base64url")
    return value


def jose_header_typ(token: str, what: str) -> Any:
    """The ``typ`` of a compact JOSE token's protected header, read without touching the rest
    (cheap: the signature check that follows parses the whole token anyway)."""
    head = token.split(".", 1)[0]
    if len(head) > 4096:
        raise MalformedMessageError(f"{what}: JOSE header too long")
    return parse_json_object(b64d(head, f"{what} header"), f"{what} header").get("typ")


_MISSING = object()


class Fields:
    """A checked view of one decoded JSON object; ``done()`` rejects leftover keys."""

    def __init__(self, obj: Any, what: str) -> None:
        if not isinstance(obj, dict):
            raise MalformedMessageError(f"{what}: expected an object, got {type(obj).__name__}")
        self._obj = obj
        self._seen: set[str] = set()
        self.what = what

    def _get(self, key: str, optional: bool) -> Any:
        self._seen.add(key)
        value = self._obj.get(key, _MISSING)
        if value is _MISSING:
            if optional:
                return None
            raise MalformedMessageError(f"{self.what}: missing field {key!r}")
        return value

    def header(self, typ: str, version: int = VERSION) -> None:
        """Check the ``v`` and ``t`` fields every migsec message carries (``version``: the
        message's own, where it has one of its own)."""
        got_version = self.integer("v", 0, 255)
        if got_version != version:
            raise MalformedMessageError(f"{self.what}: unsupported version {got_version}, expected {version}")
        got = self.string("t")
        if got != typ:
            raise MalformedMessageError(f"{self.what}: message type {got!r}, expected {typ!r}")

    def string(self, key: str, *, optional: bool = False, max_len: int = MAX_STRING) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise MalformedMessageError(f"{self.what}: field {key!r} must be a string")
        if len(value) > max_len:
            raise MalformedMessageError(f"{self.what}: field {key!r} longer than {max_len}")
        return value

    def ident(self, key: str, *, optional: bool = False) -> Any:
        value = self.string(key, optional=optional, max_len=255)
        # the error text (an f-string) is built only when it is needed: this runs ~20x a handshake
        if value is not None and not _ID_RE.match(value):
            check_ident(value, f"{self.what}: field {key!r}")
        return value

    def choice(self, key: str, allowed: Iterable[str]) -> str:
        value = self.string(key)
        allowed = tuple(allowed)
        if value not in allowed:
            raise MalformedMessageError(f"{self.what}: field {key!r} must be one of {allowed}")
        return value

    def integer(self, key: str, lo: int, hi: int, *, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise MalformedMessageError(f"{self.what}: field {key!r} must be an integer in [{lo}, {hi}]")
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(key, False)
        if not isinstance(value, bool):
            raise MalformedMessageError(f"{self.what}: field {key!r} must be true or false")
        return value

    def blob(self, key: str, *, size: int | None = None, min_size: int = 0, max_size: int = 4096,
             optional: bool = False) -> Any:
        text = self.string(key, optional=optional, max_len=max_size * 2)
        if text is None:
            return None
        value = _b64url_bytes(text)
        if value is None:
            raise MalformedMessageError(f"{self.what}: field {key!r} is not base64url")
        if size is not None and len(value) != size:
            raise MalformedMessageError(f"{self.what}: field {key!r} must be {size} bytes")
        if not min_size <= len(value) <= max_size:
            raise MalformedMessageError(
                f"{self.what}: field {key!r} must be {min_size}..{max_size} bytes")
        return value

    def string_map(self, key: str, *, optional: bool = False, max_items: int = 256) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, dict) or len(value) > max_items:
            raise MalformedMessageError(f"{self.what}: field {key!r} must be an object of strings")
        for k, v in value.items():
            if not isinstance(v, str) or len(k) > MAX_STRING or len(v) > MAX_STRING:
                raise MalformedMessageError(f"{self.what}: field {key!r} must map strings to strings")
        return dict(value)

    def scalar_map(self, key: str, *, optional: bool = False, max_items: int = 64) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        check_scalar_map(value, f"{self.what}: field {key!r}", max_items)
        return dict(value)

    def string_list(self, key: str, *, max_items: int = 64) -> list[str]:
        value = self._get(key, False)
        if not isinstance(value, list) or len(value) > max_items:
            raise MalformedMessageError(f"{self.what}: field {key!r} must be a list of strings")
        for item in value:
            if not isinstance(item, str) or len(item) > MAX_STRING:
                raise MalformedMessageError(f"{self.what}: field {key!r} must be a list of strings")
        return list(value)

    def raw(self, key: str, *, optional: bool = False) -> Any:
        return self._get(key, optional)

    def done(self) -> None:
        extra = set(self._obj) - self._seen
        if extra:
            raise MalformedMessageError(f"{self.what}: unknown field(s) {sorted(extra)}")


def check_ident(value: Any, what: str) -> str:
    """User ids, domain ids, VM names, migration ids: short printable tokens."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise MalformedMessageError(f"{what} must be 1-255 characters of [A-Za-z0-9._:@+-]")
    return value


def check_scalar_map(value: Any, what: str, max_items: int = 64) -> Mapping[str, Any]:
    """An options object: string keys, values str / int / bool (no nesting, no floats)."""
    # a decoded JSON object is a plain dict: skip the (slower) abstract Mapping check for it
    if (type(value) is not dict and not isinstance(value, Mapping)) or len(value) > max_items:
        raise MalformedMessageError(f"{what} must be an object of at most {max_items} entries")
    for k, v in value.items():
        if not isinstance(k, str) or len(k) > 255:
            raise MalformedMessageError(f"{what} keys must be short strings")
        if isinstance(v, str):
            if len(v) > MAX_STRING:
                raise MalformedMessageError(f"{what} value for {k!r} is too long")
        elif not isinstance(v, (int, bool)):
            raise MalformedMessageError(f"{what} value for {k!r} must be a string, integer or boolean")
    return value

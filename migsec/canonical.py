"""The one canonical JSON form that migsec hashes and signs.

Sorted keys, no whitespace, no NaN or infinities. Protocol messages keep non-ASCII
characters as UTF-8; the audit ledger escapes them (``ascii=True``) so that each
line is plain ASCII. Both forms are fixed: digests already signed depend on them.

Reading the other way, ``no_duplicates`` and ``no_constant`` are the ``json`` hooks
with which the JOSE envelope and the protocol codec refuse ambiguous input.
"""
from __future__ import annotations

import json
from typing import Any

from migsec.errors import MalformedMessageError


# Built once: json.dumps with keyword arguments builds a new encoder on every call, which
# showed up in the handshake profile. The encoders hold only these settings, no state.
_ENCODERS = {
    flag: json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=flag, allow_nan=False)
    for flag in (False, True)
}


def canonical_json(value: Any, *, ascii: bool = False) -> bytes:
    """``value`` in canonical form; TypeError / ValueError if it is not plain JSON."""
    text = _ENCODERS[bool(ascii)].encode(value)
    return text.encode("ascii" if ascii else "utf-8")


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a member named twice could be read two ways; refuse it."""
    out = dict(pairs)  # in C; a duplicate shows as a shorter dict, then find it to name it
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise MalformedMessageError(f"duplicate JSON member {key!r}")
            seen.add(key)
    return out


def no_constant(name: str) -> Any:
    """``parse_constant``: NaN and the infinities are not JSON."""
    raise MalformedMessageError(f"JSON constant {name} is not allowed")

"""Commit messages (DESIGN §3.4): compact JWS, kept in both audit ledgers.

Receipt  (B -> A): B restored the VM paused; per-stream SHA-256 of what B wrote.
Decision (A -> B): commit or abort, bound to the receipt by its hash.
Resumed  (B -> A): B runs the VM, bound to the decision by its hash.

Each is signed by its domain's certificate key and carries both DIDs and the
migration id, so years later ``X.verify(token, signer_certificate_key)`` still
proves who agreed to what. Send them in CONTROL records as
``{"t": "receipt" | "decision" | "resumed", "jws": token}``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, TypeVar

from migsec.crypto import SigningKey, VerifyingKey, sha256
from migsec.crypto.envelope import jws_peek, jws_sign, jws_verify
from migsec.errors import MalformedMessageError, SignatureError, TicketError, TicketTamperedError
from migsec.protocol.codec import MAX_EPOCH, VERSION, Fields, b64e, check_ident, jose_header_typ
from migsec.protocol.messages import check_token, from_epoch, to_epoch

_STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+\-]{0,254}$")
T = TypeVar("T", bound="_Signed")
# cold: B restored the VM paused and waits for the decision; live: libvirt's Finish left it
# paused at B (VIR_MIGRATE_PAUSED), which waits for the decision too (streams = each byte
# channel's SHA-256 per direction). "running-live" (before the live move waited for the
# decision) is still read from old ledgers, never accepted by a source.
RECEIPT_STATES = ("restored-paused", "finished-paused", "running-live")


def token_hash(token: str) -> bytes:
    """SHA-256 of a compact token's ASCII form: how one commit message names the previous one."""
    return sha256(token.encode("ascii"))


class _Signed:
    TYP: ClassVar[str]
    KIND: ClassVar[str]

    def claims(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def sign(self, key: SigningKey, *, kid: str | None = None) -> str:
        return jws_sign(self.claims(), key, kid=kid, typ=self.TYP)

    @classmethod
    def from_claims(cls: type[T], obj: Any) -> T:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def peek(cls: type[T], token: str) -> T:
        """Decode WITHOUT verifying (to find the signer); never trust the result."""
        check_token(token, cls.KIND, 3)
        _h, claims = jws_peek(token)
        return cls.from_claims(claims)

    @classmethod
    def verify(cls: type[T], token: str, key: VerifyingKey, *, migration_id: str | None = None) -> T:
        """Check the signature (and, if given, the migration id); return the message."""
        check_token(token, cls.KIND, 3)
        typ = jose_header_typ(token, cls.KIND)
        if typ != cls.TYP:
            raise MalformedMessageError(f"{cls.KIND} has JWS typ {typ!r}, expected {cls.TYP!r}")
        try:
            claims = jws_verify(token, key)
        except SignatureError as exc:
            raise TicketTamperedError(f"{cls.KIND} signature does not verify under the signer's key") from exc
        msg = cls.from_claims(claims)
        if migration_id is not None and getattr(msg, "migration_id") != migration_id:
            raise TicketError(f"{cls.KIND} is for migration {getattr(msg, 'migration_id')!r}, not {migration_id!r}")
        return msg


def _common(obj: Any, what: str, typ: str) -> tuple[Fields, str, str, str, datetime]:
    f = Fields(obj, what)
    f.header(typ)
    return f, f.ident("mid"), f.ident("src"), f.ident("dest"), from_epoch(f.integer("iat", 0, MAX_EPOCH))


def _check_common(msg: Any) -> None:
    for name in ("migration_id", "src_did", "dest_did"):
        check_ident(getattr(msg, name), f"{type(msg).__name__}.{name}")
    if not isinstance(msg.issued_at, datetime) or msg.issued_at.tzinfo is None:
        raise MalformedMessageError(f"{type(msg).__name__}.issued_at must be an aware datetime")


def _check_hash(value: Any, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise MalformedMessageError(f"{what} must be a 32-byte SHA-256")


@dataclass(frozen=True)
class Receipt(_Signed):
    """B's signed receipt: what arrived (per-stream SHA-256) and that the VM is restored paused
    (cold) or that libvirt's live migration left it paused here (``finished-paused``)."""

    TYP: ClassVar[str] = "migsec-receipt+jwt"
    KIND: ClassVar[str] = "Receipt"
    migration_id: str
    src_did: str
    dest_did: str
    streams: Mapping[str, bytes]
    transcript_hash: bytes
    issued_at: datetime
    state: str = "restored-paused"

    def __post_init__(self) -> None:
        _check_common(self)
        _check_hash(self.transcript_hash, "Receipt.transcript_hash")
        if self.state not in RECEIPT_STATES:
            raise MalformedMessageError(f"Receipt.state must be one of {RECEIPT_STATES}")
        if not isinstance(self.streams, Mapping) or not 0 < len(self.streams) <= 1024:
            raise MalformedMessageError("Receipt.streams must name 1..1024 streams")
        for name, digest in self.streams.items():
            if not isinstance(name, str) or not _STREAM_NAME.match(name):
                raise MalformedMessageError(f"Receipt stream name {name!r} is not a short token")
            _check_hash(digest, f"Receipt digest of stream {name!r}")
        object.__setattr__(self, "streams", MappingProxyType(dict(self.streams)))

    def claims(self) -> dict[str, Any]:
        return {"v": VERSION, "t": "receipt", "mid": self.migration_id, "src": self.src_did,
                "dest": self.dest_did, "iat": to_epoch(self.issued_at), "state": self.state,
                "th": b64e(self.transcript_hash),
                "streams": {k: v.hex() for k, v in self.streams.items()}}

    @classmethod
    def from_claims(cls, obj: Any) -> "Receipt":
        f, mid, src, dest, iat = _common(obj, "Receipt", "receipt")
        streams = f.string_map("streams", max_items=1024)
        try:
            digests = {k: bytes.fromhex(v) for k, v in streams.items() if len(v) == 64}
        except ValueError:
            raise MalformedMessageError("Receipt: stream digests must be hex SHA-256") from None
        if len(digests) != len(streams):
            raise MalformedMessageError("Receipt: stream digests must be hex SHA-256")
        msg = cls(migration_id=mid, src_did=src, dest_did=dest, streams=digests,
                  transcript_hash=f.blob("th", size=32), issued_at=iat, state=f.choice("state", RECEIPT_STATES))
        f.done()
        return msg


@dataclass(frozen=True)
class Decision(_Signed):
    """A's durable decision: "commit" (needs the receipt's hash) or "abort"."""

    TYP: ClassVar[str] = "migsec-decision+jwt"
    KIND: ClassVar[str] = "Decision"
    migration_id: str
    src_did: str
    dest_did: str
    decision: str
    issued_at: datetime
    receipt_hash: bytes | None = None
    reason: str | None = field(default=None)

    def __post_init__(self) -> None:
        _check_common(self)
        if self.decision not in ("commit", "abort"):
            raise MalformedMessageError("Decision.decision must be 'commit' or 'abort'")
        if self.decision == "commit" or self.receipt_hash is not None:
            _check_hash(self.receipt_hash, "Decision.receipt_hash (required for commit)")
        if self.reason is not None and (not isinstance(self.reason, str) or len(self.reason) > 1024):
            raise MalformedMessageError("Decision.reason must be at most 1024 characters")

    def claims(self) -> dict[str, Any]:
        c: dict[str, Any] = {"v": VERSION, "t": "decision", "mid": self.migration_id, "src": self.src_did,
                             "dest": self.dest_did, "iat": to_epoch(self.issued_at), "decision": self.decision}
        if self.receipt_hash is not None:
            c["receipt"] = b64e(self.receipt_hash)
        if self.reason is not None:
            c["reason"] = self.reason
        return c

    @classmethod
    def from_claims(cls, obj: Any) -> "Decision":
        f, mid, src, dest, iat = _common(obj, "Decision", "decision")
        msg = cls(migration_id=mid, src_did=src, dest_did=dest, issued_at=iat,
                  decision=f.choice("decision", ("commit", "abort")),
                  receipt_hash=f.blob("receipt", size=32, optional=True),
                  reason=f.string("reason", optional=True, max_len=1024))
        f.done()
        return msg


@dataclass(frozen=True)
class Resumed(_Signed):
    """B's statement that the VM runs at B, answering A's commit decision."""

    TYP: ClassVar[str] = "migsec-resumed+jwt"
    KIND: ClassVar[str] = "Resumed"
    migration_id: str
    src_did: str
    dest_did: str
    decision_hash: bytes
    issued_at: datetime
    state: str = "running"

    def __post_init__(self) -> None:
        _check_common(self)
        _check_hash(self.decision_hash, "Resumed.decision_hash")
        if self.state != "running":
            raise MalformedMessageError("Resumed.state must be 'running'")

    def claims(self) -> dict[str, Any]:
        return {"v": VERSION, "t": "resumed", "mid": self.migration_id, "src": self.src_did,
                "dest": self.dest_did, "iat": to_epoch(self.issued_at), "state": self.state,
                "decision": b64e(self.decision_hash)}

    @classmethod
    def from_claims(cls, obj: Any) -> "Resumed":
        f, mid, src, dest, iat = _common(obj, "Resumed", "resumed")
        msg = cls(migration_id=mid, src_did=src, dest_did=dest, issued_at=iat,
                  decision_hash=f.blob("decision", size=32), state=f.choice("state", ("running",)))
        f.done()
        return msg

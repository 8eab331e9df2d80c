"""Message bodies shared by the local exchange and the handshake.

``MigrationRequest`` is the paper's Mig_Rqst; ``AuthorizationTicket`` is Authr_Tkt,
a compact JWS by the source domain's key, so any JOSE tool can check it with the
domain certificate's public key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Mapping

from migsec.crypto import SigningKey, VerifyingKey, sha256
from migsec.crypto.envelope import jws_peek, jws_sign, jws_verify
from migsec.errors import (
    MalformedMessageError,
    SignatureError,
    TicketExpiredError,
    TicketTamperedError,
)
from migsec.protocol.codec import (
    MAX_EPOCH,
    VERSION,
    Fields,
    b64e,
    canonical_json,
    check_ident,
    check_scalar_map,
)
from migsec.protocol.plan import MigrationPlan

MODES = ("cold", "live")
# Mig_Rqst's own version. 2: the VM's facts travel only in the typed ``plan`` (version 1 also
# carried them as ``|``/``,``-joined string options, which a ``|`` in a disk path broke); a
# version-1 request is refused by name, never read as if it had no facts.
REQUEST_VERSION = 2
MAX_TOKEN = 60 * 1024


def to_epoch(when: datetime) -> int:
    if when.tzinfo is None:
        raise MalformedMessageError("times must be timezone-aware (UTC)")
    return int(when.timestamp())


def from_epoch(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def check_token(value: Any, what: str, parts: int) -> str:
    """A JOSE compact token of ``parts`` parts, bounded in size (shape only)."""
    if not isinstance(value, str) or len(value) > MAX_TOKEN or value.count(".") != parts - 1:
        raise MalformedMessageError(f"{what} must be a compact JOSE token of {parts} parts")
    return value


def _frozen_map(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class MigrationRequest:
    """Mig_Rqst: which VM, how (cold/live), where its disks and networks go, to which domain.

    ``plan`` is the typed migration plan A's AZ vouches for (the VM's facts and disks); a
    request as the user sends it has none, nor has a recovery conversation's. It must name the
    same VM, mode and mappings. ``options`` carry only what the user asked for (persistent,
    undefine_source, bandwidth, timeout, dry_run) or the conversation's purpose, never VM facts.
    """

    vm: str
    mode: str
    dest_did: str
    storage_map: Mapping[str, str] = field(default_factory=dict)
    network_map: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    plan: MigrationPlan | None = None

    def __post_init__(self) -> None:
        check_ident(self.vm, "MigrationRequest.vm")
        check_ident(self.dest_did, "MigrationRequest.dest_did")
        if self.mode not in MODES:
            raise MalformedMessageError(f"MigrationRequest.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("storage_map", "network_map"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or len(value) > 256 or not all(
                    isinstance(k, str) and isinstance(v, str) and k and v and len(k) <= 4096 and len(v) <= 4096
                    for k, v in value.items()):
                raise MalformedMessageError(f"MigrationRequest.{name} must map non-empty strings to strings")
            object.__setattr__(self, name, _frozen_map(value))
        check_scalar_map(self.options, "MigrationRequest.options")
        object.__setattr__(self, "options", _frozen_map(self.options))
        p = self.plan
        if p is not None:
            if not isinstance(p, MigrationPlan):
                raise MalformedMessageError("MigrationRequest.plan must be a MigrationPlan")
            if (p.vm_name, p.mode, dict(p.storage_map), dict(p.network_map)) != \
                    (self.vm, self.mode, dict(self.storage_map), dict(self.network_map)):
                raise MalformedMessageError("MigrationRequest.plan names another VM, mode or mapping than the request")

    def claims(self) -> dict[str, Any]:
        claims = {
            "v": REQUEST_VERSION, "t": "mig-rqst", "vm": self.vm, "mode": self.mode, "dest": self.dest_did,
            "storage": dict(self.storage_map), "network": dict(self.network_map),
            "options": dict(self.options),
        }
        if self.plan is not None:  # absent, not null: a request without one keeps its digest
            claims["plan"] = self.plan.to_dict()
        return claims

    def require_plan(self) -> MigrationPlan:
        """The plan; MalformedMessageError for a request without one (a migration moves only
        what a signed plan names: there is no other source of the VM's facts)."""
        if self.plan is None:
            raise MalformedMessageError(
                f"Mig_Rqst for {self.vm!r} carries no migration plan (the VM's facts and disks, which "
                f"the source's AZ signs): refusing it")
        return self.plan

    def digest(self) -> bytes:
        """SHA-256 over the canonical JSON: the digest(Mig_Rqst) an AuthorizationTicket carries."""
        return sha256(canonical_json(self.claims()))

    @classmethod
    def from_claims(cls, obj: Any) -> "MigrationRequest":
        f = Fields(obj, "MigrationRequest")
        f.header("mig-rqst", REQUEST_VERSION)
        req = cls(vm=f.ident("vm"), mode=f.choice("mode", MODES), dest_did=f.ident("dest"),
                  storage_map=f.string_map("storage"), network_map=f.string_map("network"),
                  options=f.scalar_map("options"), plan=_plan_of(f.raw("plan", optional=True)))
        f.done()
        return req


def _plan_of(obj: Any) -> MigrationPlan | None:
    return None if obj is None else MigrationPlan.from_dict(obj)


@dataclass(frozen=True)
class Obligation:
    """An XACML obligation the AZ applies and the destination may honour (e.g. max-bandwidth)."""

    id: str
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not 0 < len(self.id) <= 1024:
            raise MalformedMessageError("Obligation.id must be a non-empty string")
        check_scalar_map(self.attributes, f"Obligation {self.id!r} attributes")
        object.__setattr__(self, "attributes", _frozen_map(self.attributes))

    def claims(self) -> dict[str, Any]:
        return {"id": self.id, "attributes": dict(self.attributes)}

    @classmethod
    def from_claims(cls, obj: Any) -> "Obligation":
        f = Fields(obj, "obligation")
        ob = cls(id=f.string("id", max_len=1024), attributes=f.scalar_map("attributes"))
        f.done()
        return ob


AUTHZ_TYP = "migsec-authr-tkt+jwt"


def _authz_typ(typ: str | None) -> None:
    if typ != AUTHZ_TYP:
        raise MalformedMessageError(f"Authr_Tkt has JWS typ {typ!r}, expected {AUTHZ_TYP!r}")


@dataclass(frozen=True)
class AuthorizationTicket:
    """Authr_Tkt = Sign_prA(Src_DID, Dest_DID, UserID, VM, digest(Mig_Rqst), Nonce4, expiry, obligations)."""

    src_did: str
    dest_did: str
    user_id: str
    vm: str
    request_digest: bytes
    nonce4: bytes
    issued_at: datetime
    expires_at: datetime
    obligations: tuple[Obligation, ...] = ()

    def __post_init__(self) -> None:
        for name in ("src_did", "dest_did", "user_id", "vm"):
            check_ident(getattr(self, name), f"AuthorizationTicket.{name}")
        if not isinstance(self.request_digest, bytes) or len(self.request_digest) != 32:
            raise MalformedMessageError("AuthorizationTicket.request_digest must be 32 bytes")
        if not isinstance(self.nonce4, bytes) or not 16 <= len(self.nonce4) <= 64:
            raise MalformedMessageError("AuthorizationTicket.nonce4 must be 16..64 bytes")
        if self.expires_at <= self.issued_at:
            raise MalformedMessageError("AuthorizationTicket expires before it was issued")
        obligations = tuple(self.obligations)
        if len(obligations) > 64 or not all(isinstance(o, Obligation) for o in obligations):
            raise MalformedMessageError("AuthorizationTicket.obligations must be Obligation objects")
        object.__setattr__(self, "obligations", obligations)

    def claims(self) -> dict[str, Any]:
        return {
            "v": VERSION, "t": "authr-tkt", "iss": self.src_did, "aud": self.dest_did,
            "sub": self.user_id, "vm": self.vm, "req": b64e(self.request_digest),
            "nonce4": b64e(self.nonce4), "iat": to_epoch(self.issued_at), "exp": to_epoch(self.expires_at),
            "obligations": [o.claims() for o in self.obligations],
        }

    def sign(self, key: SigningKey, *, kid: str | None = None) -> str:
        return jws_sign(self.claims(), key, kid=kid, typ=AUTHZ_TYP)

    @classmethod
    def from_claims(cls, obj: Any) -> "AuthorizationTicket":
        f = Fields(obj, "AuthorizationTicket")
        f.header("authr-tkt")
        obligations = f.raw("obligations")
        if not isinstance(obligations, list) or len(obligations) > 64:
            raise MalformedMessageError("AuthorizationTicket: obligations must be a list")
        ticket = cls(
            src_did=f.ident("iss"), dest_did=f.ident("aud"), user_id=f.ident("sub"), vm=f.ident("vm"),
            request_digest=f.blob("req", size=32), nonce4=f.blob("nonce4", min_size=16, max_size=64),
            issued_at=from_epoch(f.integer("iat", 0, MAX_EPOCH)), expires_at=from_epoch(f.integer("exp", 0, MAX_EPOCH)),
            obligations=tuple(Obligation.from_claims(o) for o in obligations))
        f.done()
        return ticket

    @classmethod
    def peek(cls, token: str) -> "AuthorizationTicket":
        """Decode WITHOUT checking the signature (to find the issuer); never trust the result."""
        check_token(token, "Authr_Tkt", 3)
        _header, claims = jws_peek(token)
        return cls.from_claims(claims)

    @classmethod
    def verify(cls, token: str, key: VerifyingKey, *, now: datetime) -> "AuthorizationTicket":
        """Check the signature by the source domain's key and the validity window."""
        check_token(token, "Authr_Tkt", 3)
        try:
            claims = jws_verify(token, key, typ_check=_authz_typ)
        except SignatureError as exc:
            raise TicketTamperedError("Authr_Tkt signature does not verify under the source domain's key") from exc
        ticket = cls.from_claims(claims)
        if not ticket.issued_at.timestamp() - 300 <= now.timestamp() < ticket.expires_at.timestamp():
            raise TicketExpiredError(
                f"Authr_Tkt valid {ticket.issued_at.isoformat()}..{ticket.expires_at.isoformat()}, "
                f"not at {now.isoformat()}")
        return ticket

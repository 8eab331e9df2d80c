"""The local exchange in the source domain (DESIGN §3.1): MC <-> AS, MC -> AZ.

1. MC -> AS  ``AuthRequest(UserID, Nonce1[, epk, ssh signature])``
2. AS -> MC  ``AuthReply = salt + scrypt params, E_SK1(UserID, Nonce1, SK2, expiry), Auth_Tkt``
             with ``Auth_Tkt = E_SK3(UserID, SK2, Nonce2, expiry)``
3. MC -> AZ  ``LocalMigrationRequest = E_SK2(Mig_Rqst, Dest_DID, UserID, Nonce3), Auth_Tkt``
4. AZ        opens the ticket with SK3, checks expiry, replay and UserID, hands the
             request to the caller's PDP, then issues the AuthorizationTicket (JWS).

SK1 is the user's scrypt verifier key (what the AS stores instead of the password);
the reply is sealed under HKDF(SK1, Nonce1), so each reply has its own key. An
ssh-agent user sends an ephemeral X25519 key and a signature over the request
instead; the AS checks the signature through a callback and seals the reply
under HKDF(ECDH). E_K(x) is a compact JWE (dir + A256GCM).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Callable, Protocol

from migsec.crypto import EphemeralKey, SigningKey, hkdf_sha256, random_bytes, scrypt_key
from migsec.crypto.envelope import jwe_decrypt_dir, jwe_encrypt_dir
from migsec.errors import (
    AuthenticationError,
    DecryptionError,
    MalformedMessageError,
    TicketError,
    TicketExpiredError,
    TicketTamperedError,
)
from migsec.protocol.codec import MAX_EPOCH, VERSION, Fields, b64e, canonical_json, check_ident, parse_json_object
from migsec.protocol.framing import AUTH_REPLY, AUTH_REQUEST, LOCAL_MIGRATION_REQUEST
from migsec.protocol.messages import (
    AuthorizationTicket,
    MigrationRequest,
    Obligation,
    check_token,
    from_epoch,
    to_epoch,
)
from migsec.protocol.replay import Clock, ReplayCache, utc_now

NONCE_SIZE = 16
KEY_SIZE = 32
TICKET_LIFETIME = timedelta(minutes=10)
AUTHZ_LIFETIME = timedelta(minutes=10)
REQUEST_WINDOW = timedelta(minutes=2)  # how old a LocalMigrationRequest may be
CLOCK_SKEW = timedelta(seconds=60)
MAX_SCRYPT_MEMORY = 512 * 1024 * 1024


def _decode(data: bytes | str, what: str, typ: str) -> Fields:
    f = Fields(parse_json_object(data, what), what)
    f.header(typ)
    return f


def _reply_key(secret: bytes, nonce1: bytes, user_id: str, how: str) -> bytes:
    return hkdf_sha256(secret, salt=nonce1, info=f"migsec/v1 AuthReply {how} {user_id}".encode())


# --- messages ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuthRequest:
    """AuthReq = UserID, Nonce1 (+ epk and ssh signature for an ssh-agent user)."""

    FRAME_TYPE = AUTH_REQUEST
    user_id: str
    nonce1: bytes
    epk: bytes | None = None
    ssh_signature: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_ident(self.user_id, "AuthRequest.user_id")
        if not isinstance(self.nonce1, bytes) or len(self.nonce1) != NONCE_SIZE:
            raise MalformedMessageError(f"AuthRequest.nonce1 must be {NONCE_SIZE} bytes")
        if self.epk is not None and (not isinstance(self.epk, bytes) or len(self.epk) != 32):
            raise MalformedMessageError("AuthRequest.epk must be a 32-byte X25519 key")
        if self.ssh_signature is not None:
            if self.epk is None:
                raise MalformedMessageError("an ssh-signed AuthRequest must carry an epk")
            if not isinstance(self.ssh_signature, bytes) or not 0 < len(self.ssh_signature) <= 2048:
                raise MalformedMessageError("AuthRequest.ssh_signature must be 1..2048 bytes")

    def _claims(self) -> dict[str, Any]:
        c: dict[str, Any] = {"v": VERSION, "t": "auth-req", "user": self.user_id, "nonce1": b64e(self.nonce1)}
        if self.epk is not None:
            c["epk"] = b64e(self.epk)
        return c

    def signing_payload(self) -> bytes:
        """What an ssh-agent signs: the request without its signature, canonical JSON."""
        return b"migsec-auth-req-v1\x00" + canonical_json(self._claims())

    def with_signature(self, signature: bytes) -> "AuthRequest":
        return replace(self, ssh_signature=signature)

    def encode(self) -> bytes:
        c = self._claims()
        if self.ssh_signature is not None:
            c["ssh_sig"] = b64e(self.ssh_signature)
        return canonical_json(c)

    @classmethod
    def decode(cls, data: bytes | str) -> "AuthRequest":
        f = _decode(data, "AuthRequest", "auth-req")
        msg = cls(user_id=f.ident("user"), nonce1=f.blob("nonce1", size=NONCE_SIZE),
                  epk=f.blob("epk", size=32, optional=True),
                  ssh_signature=f.blob("ssh_sig", min_size=1, max_size=2048, optional=True))
        f.done()
        return msg


@dataclass(frozen=True)
class AuthReply:
    """AS -> MC: KDF parameters (password users), E_SK1(...) and the opaque Auth_Tkt."""

    FRAME_TYPE = AUTH_REPLY
    user_id: str
    enc_part: str
    ticket: str
    salt: bytes | None = None
    scrypt_n: int | None = None
    scrypt_r: int | None = None
    scrypt_p: int | None = None
    as_epk: bytes | None = None

    def __post_init__(self) -> None:
        check_ident(self.user_id, "AuthReply.user_id")
        check_token(self.enc_part, "AuthReply.enc_part", 5)
        check_token(self.ticket, "Auth_Tkt", 5)
        password = (self.salt, self.scrypt_n, self.scrypt_r, self.scrypt_p)
        if (self.as_epk is None) == (None in password):
            raise MalformedMessageError("AuthReply carries either scrypt parameters or an as_epk")
        if self.as_epk is not None and (not isinstance(self.as_epk, bytes) or len(self.as_epk) != 32):
            raise MalformedMessageError("AuthReply.as_epk must be 32 bytes")

    def encode(self) -> bytes:
        c: dict[str, Any] = {"v": VERSION, "t": "auth-reply", "user": self.user_id,
                             "enc": self.enc_part, "tkt": self.ticket}
        if self.as_epk is not None:
            c["epk"] = b64e(self.as_epk)
        else:
            c["kdf"] = {"alg": "scrypt", "salt": b64e(self.salt or b""), "n": self.scrypt_n,
                        "r": self.scrypt_r, "p": self.scrypt_p}
        return canonical_json(c)

    @classmethod
    def decode(cls, data: bytes | str) -> "AuthReply":
        f = _decode(data, "AuthReply", "auth-reply")
        kw: dict[str, Any] = {}
        kdf = f.raw("kdf", optional=True)
        if kdf is not None:
            k = Fields(kdf, "AuthReply.kdf")
            k.choice("alg", ("scrypt",))
            kw = dict(salt=k.blob("salt", min_size=16, max_size=64), scrypt_n=k.integer("n", 2, 2**20),
                      scrypt_r=k.integer("r", 1, 32), scrypt_p=k.integer("p", 1, 16))
            k.done()
            # the MC runs scrypt with these: bound the memory a hostile reply can make it use
            if kw["scrypt_n"] & (kw["scrypt_n"] - 1) or 128 * kw["scrypt_n"] * kw["scrypt_r"] > MAX_SCRYPT_MEMORY:
                raise MalformedMessageError("AuthReply: scrypt n must be a power of two using at most 512 MiB")
        msg = cls(user_id=f.ident("user"), enc_part=f.string("enc", max_len=60_000),
                  ticket=f.string("tkt", max_len=60_000), as_epk=f.blob("epk", size=32, optional=True), **kw)
        f.done()
        return msg


@dataclass(frozen=True)
class LocalMigrationRequest:
    """MC -> AZ: E_SK2(Mig_Rqst, Dest_DID, UserID, Nonce3), Auth_Tkt."""

    FRAME_TYPE = LOCAL_MIGRATION_REQUEST
    sealed: str
    ticket: str

    def __post_init__(self) -> None:
        check_token(self.sealed, "MigrationRequest body", 5)
        check_token(self.ticket, "Auth_Tkt", 5)

    def encode(self) -> bytes:
        return canonical_json({"v": VERSION, "t": "local-mig-req", "body": self.sealed, "tkt": self.ticket})

    @classmethod
    def decode(cls, data: bytes | str) -> "LocalMigrationRequest":
        f = _decode(data, "MigrationRequest message", "local-mig-req")
        msg = cls(sealed=f.string("body", max_len=60_000), ticket=f.string("tkt", max_len=60_000))
        f.done()
        return msg


# --- MC side -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """What a login gives the MC: SK2 and the Auth_Tkt to present to the AZ."""

    user_id: str
    sk2: bytes = field(repr=False)
    ticket: str = field(repr=False)
    expires_at: datetime


class ClientLogin:
    """MC side of steps 1-2. ``request`` is what to send; ``finish(reply, ...)`` checks the reply."""

    def __init__(self, user_id: str, *, ssh: bool = False, clock: Clock = utc_now) -> None:
        self._clock = clock
        self._ephemeral = EphemeralKey.generate("x25519") if ssh else None
        self.request = AuthRequest(user_id=user_id, nonce1=random_bytes(NONCE_SIZE),
                                   epk=self._ephemeral.public_bytes() if self._ephemeral else None)

    def sign_with(self, sign: Callable[[bytes], bytes]) -> AuthRequest:
        """Attach an ssh-agent signature (``sign`` gets the signing payload)."""
        if self._ephemeral is None:
            raise AuthenticationError("ClientLogin was not started with ssh=True")
        self.request = self.request.with_signature(sign(self.request.signing_payload()))
        return self.request

    def finish(self, reply: AuthReply, *, password: str | bytes | None = None) -> Credentials:
        """Open E_SK1 with the password (or the ssh ephemeral key); check user, nonce, expiry."""
        req = self.request
        if reply.user_id != req.user_id:
            raise AuthenticationError(f"AuthReply is for user {reply.user_id!r}, not {req.user_id!r}")
        if self._ephemeral is not None:
            if reply.as_epk is None:
                raise AuthenticationError("AuthReply has no ECDH key for an ssh-agent login")
            key = _reply_key(self._ephemeral.exchange(reply.as_epk), req.nonce1, req.user_id, "ecdh")
        else:
            if password is None or reply.salt is None:
                raise AuthenticationError("a password login needs the password and the reply's scrypt salt")
            sk1 = scrypt_key(password, reply.salt, n=reply.scrypt_n or 0, r=reply.scrypt_r or 0,
                             p=reply.scrypt_p or 0)
            key = _reply_key(sk1, req.nonce1, req.user_id, "scrypt")
        try:
            plain = jwe_decrypt_dir(reply.enc_part, key)
        except DecryptionError:
            raise AuthenticationError("AuthReply did not open: wrong password or a tampered reply") from None
        f = _decode(plain, "AuthReply part", "auth-reply-part")
        user, nonce1 = f.ident("user"), f.blob("nonce1", size=NONCE_SIZE)
        sk2, expires = f.blob("sk2", size=KEY_SIZE), from_epoch(f.integer("exp", 0, MAX_EPOCH))
        f.done()
        if user != req.user_id or nonce1 != req.nonce1:
            raise AuthenticationError("AuthReply answers another request (user or Nonce1 differ)")
        if expires <= self._clock():
            raise TicketExpiredError("AuthReply has already expired")
        return Credentials(user_id=user, sk2=sk2, ticket=reply.ticket, expires_at=expires)


def make_migration_request(creds: Credentials, request: MigrationRequest, *,
                           clock: Clock = utc_now) -> LocalMigrationRequest:
    """Step 3: seal Mig_Rqst, Dest_DID, UserID and a fresh Nonce3 under SK2."""
    body = {"v": VERSION, "t": "local-mig-body", "rqst": request.claims(), "dest": request.dest_did,
            "user": creds.user_id, "nonce3": b64e(random_bytes(NONCE_SIZE)), "time": to_epoch(clock())}
    return LocalMigrationRequest(sealed=jwe_encrypt_dir(canonical_json(body), creds.sk2), ticket=creds.ticket)


# --- AS side ---------------------------------------------------------------------------------------
class PasswordKey(Protocol):
    """The AS's record of a password user (migsec.auth.users.PasswordVerifier fits).

    Read-only members, so that frozen dataclasses fit too."""

    @property
    def key(self) -> bytes: ...
    @property
    def salt(self) -> bytes: ...
    @property
    def n(self) -> int: ...
    @property
    def r(self) -> int: ...
    @property
    def p(self) -> int: ...


def make_auth_reply(request: AuthRequest, *, sk3: bytes, password_key: PasswordKey | None = None,
                    ssh_verify: Callable[[bytes, bytes], None] | None = None,
                    lifetime: timedelta = TICKET_LIFETIME, clock: Clock = utc_now) -> AuthReply:
    """Step 2 for a known user: a fresh SK2 sealed for the MC and inside Auth_Tkt under SK3.

    Give ``password_key`` for a password user, or ``ssh_verify(payload, signature)`` (raising
    AuthenticationError on a bad signature) for an ssh-agent user.
    """
    if len(sk3) != KEY_SIZE:
        raise TicketError("SK3 must be 32 bytes")
    now = clock()
    expires = now + lifetime
    sk2 = random_bytes(KEY_SIZE)
    kw: dict[str, Any]
    if request.ssh_signature is not None:
        if ssh_verify is None:
            raise AuthenticationError(f"user {request.user_id!r} sent an ssh signature but has no ssh key")
        ssh_verify(request.signing_payload(), request.ssh_signature)
        assert request.epk is not None
        eph = EphemeralKey.generate("x25519")
        key = _reply_key(eph.exchange(request.epk), request.nonce1, request.user_id, "ecdh")
        kw = {"as_epk": eph.public_bytes()}
    else:
        if password_key is None:
            raise AuthenticationError(f"user {request.user_id!r} has no password; use the ssh agent")
        key = _reply_key(password_key.key, request.nonce1, request.user_id, "scrypt")
        kw = {"salt": password_key.salt, "scrypt_n": password_key.n, "scrypt_r": password_key.r,
              "scrypt_p": password_key.p}
    part = {"v": VERSION, "t": "auth-reply-part", "user": request.user_id, "nonce1": b64e(request.nonce1),
            "sk2": b64e(sk2), "exp": to_epoch(expires)}
    ticket = {"v": VERSION, "t": "auth-tkt", "user": request.user_id, "sk2": b64e(sk2),
              "nonce2": b64e(random_bytes(NONCE_SIZE)), "iat": to_epoch(now), "exp": to_epoch(expires)}
    return AuthReply(user_id=request.user_id, enc_part=jwe_encrypt_dir(canonical_json(part), key),
                     ticket=jwe_encrypt_dir(canonical_json(ticket), sk3, kid="sk3"), **kw)


# --- AZ side ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckedRequest:
    """A request whose ticket and body verified; ask the PDP about it, then ``issue``."""

    user_id: str
    request: MigrationRequest
    nonce3: bytes
    ticket_expires_at: datetime


class AuthorizationServer:
    """AZ side of steps 3-4 for one source domain."""

    def __init__(self, *, did: str, key: SigningKey, sk3: bytes, replay_cache: ReplayCache,
                 clock: Clock = utc_now, kid: str | None = None) -> None:
        check_ident(did, "AZ domain id")
        if len(sk3) != KEY_SIZE:
            raise TicketError("SK3 must be 32 bytes")
        self.did = did
        self._key, self._sk3, self._replay, self._clock, self._kid = key, sk3, replay_cache, clock, kid

    def open_request(self, msg: LocalMigrationRequest) -> CheckedRequest:
        """Check Auth_Tkt (SK3, expiry, replay) and the request (SK2, same UserID, fresh, unseen)."""
        now = self._clock()
        try:
            ticket_plain = jwe_decrypt_dir(msg.ticket, self._sk3)
        except DecryptionError:
            raise TicketTamperedError("Auth_Tkt does not open under SK3 (tampered or foreign)") from None
        t = _decode(ticket_plain, "Auth_Tkt", "auth-tkt")
        t_user, sk2 = t.ident("user"), t.blob("sk2", size=KEY_SIZE)
        nonce2 = t.blob("nonce2", size=NONCE_SIZE)
        issued, expires = from_epoch(t.integer("iat", 0, MAX_EPOCH)), from_epoch(t.integer("exp", 0, MAX_EPOCH))
        t.done()
        if not issued - CLOCK_SKEW <= now < expires:
            raise TicketExpiredError(f"Auth_Tkt of {t_user!r} expired at {expires.isoformat()}")
        try:
            body_plain = jwe_decrypt_dir(msg.sealed, sk2)
        except DecryptionError:
            raise TicketTamperedError("MigrationRequest does not open under the ticket's SK2") from None
        b = _decode(body_plain, "MigrationRequest body", "local-mig-body")
        request = MigrationRequest.from_claims(b.raw("rqst"))
        dest, user = b.ident("dest"), b.ident("user")
        nonce3, sent = b.blob("nonce3", size=NONCE_SIZE), from_epoch(b.integer("time", 0, MAX_EPOCH))
        b.done()
        if user != t_user:
            raise AuthenticationError(f"MigrationRequest is from {user!r} but Auth_Tkt is for {t_user!r}")
        if dest != request.dest_did:
            raise MalformedMessageError("MigrationRequest: Dest_DID differs from the one in Mig_Rqst")
        if not now - REQUEST_WINDOW <= sent <= now + CLOCK_SKEW:
            raise TicketExpiredError(f"MigrationRequest time {sent.isoformat()} is outside the window")
        # both checks first, then both records: a refused request burns nothing
        self._replay.check("MigrationRequest Nonce3", nonce3)
        self._replay.check("Auth_Tkt Nonce2", nonce2)
        self._replay.add("MigrationRequest Nonce3", nonce3, sent + REQUEST_WINDOW + CLOCK_SKEW)
        self._replay.add("Auth_Tkt Nonce2", nonce2, expires)
        return CheckedRequest(user_id=user, request=request, nonce3=nonce3, ticket_expires_at=expires)

    def issue(self, checked: CheckedRequest, *, obligations: tuple[Obligation, ...] | list[Obligation] = (),
              lifetime: timedelta = AUTHZ_LIFETIME) -> tuple[AuthorizationTicket, str]:
        """Step 4 after a Permit: the AuthorizationTicket and its compact JWS."""
        now = self._clock()
        ticket = AuthorizationTicket(
            src_did=self.did, dest_did=checked.request.dest_did, user_id=checked.user_id,
            vm=checked.request.vm, request_digest=checked.request.digest(), nonce4=random_bytes(NONCE_SIZE),
            issued_at=now, expires_at=now + lifetime, obligations=tuple(obligations))
        return ticket, ticket.sign(self._key, kid=self._kid)

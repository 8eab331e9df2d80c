"""The inter-domain handshake (DESIGN §3.2): two messages, then traffic keys.

    A -> B  MigReq  = {body: JWE_to_B( JWS_A(Mig_Rqst, Src_DID, Dest_DID, UserID, eA, NonceA,
                                            time, migration_id[, resume_of]) ),
                       Authr_Tkt, Cert_A}
    B -> A  MigResp = {body: JWE_to_A( JWS_B(Dest_DID, Src_DID, ack|nack[+reason], Nonce5, NonceA,
                                             eB, H(MigReq), migration_id) ),
                       Cert_B}

eA and eB sit inside the signed bodies, so a man in the middle cannot swap them
without breaking a signature; B's body signs H(MigReq), which binds the answer to
the exact request. Both sides then run HKDF-SHA-256 over ECDH(eA, eB) with the
transcript hash as salt and get one key per direction (SessionKeys). Each side is
a sans-IO state machine whose legal moves are the table below; anything else
raises UnexpectedMessageError (ReflectionError for our own kind of message) and
leaves the object in ERROR, holding no keys.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from migsec.crypto import EphemeralKey, SigningKey, VerifyingKey, hkdf_sha256, random_bytes, sha256
from migsec.crypto.envelope import jwe_decrypt, jwe_encrypt, jws_sign, jws_verify
from migsec.errors import (
    DecryptionError,
    DidMismatchError,
    HandshakeError,
    MalformedMessageError,
    MigsecError,
    SignatureError,
    TicketExpiredError,
    TicketTamperedError,
    UnexpectedMessageError,
)
from migsec.protocol.codec import (
    MAX_EPOCH,
    VERSION,
    Fields,
    b64e,
    canonical_json,
    check_ident,
    parse_json_object,
)
from migsec.protocol.errors import KeyBindingError, ReflectionError
from migsec.protocol.framing import CERT_REPLY, CERT_REQUEST, CLOSED, CONTROL_MAX, MIG_REQ, MIG_RESP, NEED_DATA, RECORD, RECORD_MAX, Frame, FrameDecoder, encode_frame
from migsec.protocol.messages import AuthorizationTicket, MigrationRequest, check_token, from_epoch, to_epoch
from migsec.protocol.replay import Clock, ReplayCache, utc_now
from migsec.protocol.session import SessionKeys

NONCE_SIZE = 16
TIME_WINDOW = timedelta(minutes=2)
CURVE = "x25519"
MAX_CERT = 16 * 1024
REQ_TYP = "migsec-migreq+jwt"
RESP_TYP = "migsec-migresp+jwt"
_LIMITS = {MIG_REQ: CONTROL_MAX, MIG_RESP: CONTROL_MAX, RECORD: RECORD_MAX}


class Identity(Protocol):
    """This domain: migsec.pki.DomainIdentity fits (read-only members, as frozen dataclasses have)."""

    @property
    def did(self) -> str: ...
    @property
    def key(self) -> SigningKey: ...
    @property
    def cert_pem(self) -> bytes: ...


class Peer(Protocol):
    """migsec.pki.VerifiedPeer fits."""

    @property
    def did(self) -> str: ...
    @property
    def public_key(self) -> VerifyingKey: ...
    @property
    def not_after(self) -> datetime: ...


class Trust(Protocol):
    """migsec.pki.TrustStore fits."""

    def verify(self, cert_pem: bytes, *, expected_did: str | None = None, at: datetime) -> Peer: ...


# --- states and the table of legal moves ---------------------------------------------------------
IDLE = "IDLE"
AWAITING_RESPONSE = "AWAITING_RESPONSE"
AWAITING_REQUEST = "AWAITING_REQUEST"
DECIDING = "DECIDING"
DONE = "DONE"
REFUSED = "REFUSED"
ERROR = "ERROR"

# (state, move) -> next state; a move not listed here is illegal in that state
SOURCE_TRANSITIONS = {
    (IDLE, "send MigReq"): AWAITING_RESPONSE,
    (AWAITING_RESPONSE, "receive MigResp ack"): DONE,
    (AWAITING_RESPONSE, "receive MigResp nack"): REFUSED,
}
# states in which next_event() leaves further bytes alone (NEED_DATA)
_PAUSED = (DECIDING, DONE, REFUSED)
DESTINATION_TRANSITIONS = {
    (AWAITING_REQUEST, "receive MigReq"): DECIDING,
    (DECIDING, "send MigResp ack"): DONE,
    (DECIDING, "send MigResp nack"): REFUSED,
}


# --- events ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MigrationProposed:
    """B: a MigReq passed every check; run policy and capacity, then ``accept()`` or ``refuse()``."""

    migration_id: str
    resume_of: str | None
    src_did: str
    user_id: str
    request: MigrationRequest
    authorization: AuthorizationTicket
    authorization_token: str = field(repr=False)
    peer: Any = field(repr=False)
    signed_request: str = field(repr=False)  # JWS_A of the body: for the audit ledger


@dataclass(frozen=True)
class MigrationAccepted:
    """A: B said Ack; ``keys`` start the record layer."""

    keys: SessionKeys
    peer: Any = field(repr=False)
    signed_response: str = field(repr=False)


@dataclass(frozen=True)
class MigrationRefused:
    """A: B said Nack (signed); ``reason`` is B's."""

    migration_id: str
    reason: str
    peer: Any = field(repr=False)
    signed_response: str = field(repr=False)


# --- shared helpers ----------------------------------------------------------------------------------
def transcript_hash(mig_req: bytes, mig_resp: bytes) -> bytes:
    """SHA-256 over both handshake frame payloads, each length-prefixed."""
    return sha256(b"migsec/v1 transcript\x00" + struct.pack(">I", len(mig_req)) + mig_req
                  + struct.pack(">I", len(mig_resp)) + mig_resp)


def derive_session_keys(shared: bytes, th: bytes, *, migration_id: str, src_did: str, dest_did: str,
                        resume_of: str | None) -> SessionKeys:
    info = canonical_json({"p": "migsec/v1 traffic", "mid": migration_id, "src": src_did, "dest": dest_did})
    okm = hkdf_sha256(shared, salt=th, info=info, length=64)
    return SessionKeys(migration_id=migration_id, a_to_b=okm[:32], b_to_a=okm[32:], transcript_hash=th,
                       src_did=src_did, dest_did=dest_did, resume_of=resume_of)


def _outer(payload: bytes, typ: str) -> Fields:
    f = Fields(parse_json_object(payload, typ), typ)
    f.header(typ)
    return f


def _cert(f: Fields) -> bytes:
    text = f.string("cert", max_len=MAX_CERT)
    if not text.isascii() or not text.startswith("-----BEGIN CERTIFICATE-----"):
        raise MalformedMessageError(f"{f.what}: cert must be an ASCII PEM certificate")
    return text.encode("ascii")


def _open_signed(sealed: str, own_key: SigningKey, peer: Peer, want_typ: str, other_typ: str,
                 what: str) -> tuple[str, dict[str, Any]]:
    """Decrypt the JWE addressed to us, check typ (reflection) and the peer's signature."""
    try:
        inner = jwe_decrypt(sealed, own_key)
        token = inner.decode("ascii")
    except (DecryptionError, UnicodeDecodeError):
        raise HandshakeError(f"{what} body is not encrypted to this domain's key") from None
    check_token(token, f"{what} signed body", 3)

    def check_typ(typ: str | None) -> None:  # before the signature: a reflection is named as one
        if typ == other_typ:
            raise ReflectionError(f"{what} body is a {other_typ}: our own kind of message came back")
        if typ != want_typ:
            raise MalformedMessageError(f"{what} body has typ {typ!r}, expected {want_typ!r}")

    try:
        return token, jws_verify(token, peer.public_key, typ_check=check_typ)
    except SignatureError:
        raise KeyBindingError(
            f"{what} body is not signed by the key of the certificate it came with "
            "(substituted ephemeral key or body)") from None


class _Machine:
    _TABLE: dict[tuple[str, str], str] = {}

    def __init__(self, state: str, clock: Clock) -> None:
        self.state = state
        self._clock = clock
        self._decoder = FrameDecoder(_LIMITS)

    def _move(self, move: str) -> None:
        nxt = self._TABLE.get((self.state, move))
        if nxt is None:
            state, self.state = self.state, ERROR
            raise UnexpectedMessageError(f"{move!r} is not allowed in state {state}")
        self.state = nxt

    def _guard(self, fn, *args):  # any failure is terminal
        try:
            return fn(*args)
        except MigsecError:
            self.state = ERROR
            raise

    def receive_data(self, data: bytes) -> None:
        if self.state == ERROR:
            raise UnexpectedMessageError("handshake is in ERROR state")
        self._guard(self._decoder.receive_data, data)

    def trailing_data(self) -> bytes:
        """Bytes received after the handshake's last frame (the first records): feed them
        to the RecordLayer."""
        return self._decoder.take_buffer()

    def _next_frame(self) -> Frame | object:
        if self.state == ERROR:
            raise UnexpectedMessageError("handshake is in ERROR state")
        if self.state in _PAUSED:
            return NEED_DATA  # what follows belongs to the record layer: see trailing_data()
        frame = self._guard(self._decoder.next_frame)
        if frame is CLOSED:
            state, self.state = self.state, ERROR
            raise HandshakeError(f"connection closed during the handshake (state {state})")
        return frame


# --- A: the source domain ---------------------------------------------------------------------------
class SourceHandshake(_Machine):
    """A's side: ``initiate(...) -> bytes``, then feed B's bytes and call ``next_event()``."""

    _TABLE = SOURCE_TRANSITIONS

    def __init__(self, identity: Identity, trust: Trust, *, peer_did: str, peer_cert_pem: bytes,
                 clock: Clock = utc_now, time_window: timedelta = TIME_WINDOW) -> None:
        super().__init__(IDLE, clock)
        check_ident(peer_did, "peer domain id")
        self._identity, self._trust, self._window = identity, trust, time_window
        self.peer_did = peer_did
        self._peer_cert = peer_cert_pem
        self._verified_peer: Peer | None = None
        self._ephemeral: EphemeralKey | None = None
        self._nonce_a = b""
        self._mig_req = b""
        self.migration_id = ""
        self.resume_of: str | None = None
        self.keys: SessionKeys | None = None
        self._signed_request: str | None = None

    @property
    def signed_request(self) -> str | None:
        """Our JWS of the MigReq body (before encryption to B), for A's audit ledger; None
        until ``initiate``."""
        return self._signed_request

    def initiate(self, request: MigrationRequest, authorization_token: str, *,
                 migration_id: str | None = None, resume_of: str | None = None) -> bytes:
        """The MigReq frame. ``resume_of`` names the migration whose transfer this continues."""
        return self._guard(self._initiate, request, authorization_token, migration_id, resume_of)

    def _initiate(self, request: MigrationRequest, token: str, migration_id: str | None,
                  resume_of: str | None) -> bytes:
        self._move("send MigReq")
        me = self._identity
        if request.dest_did != self.peer_did:
            raise DidMismatchError(f"request is for {request.dest_did!r}, handshake is with {self.peer_did!r}")
        if self.peer_did == me.did:
            raise ReflectionError("a domain cannot migrate to itself")
        ticket = AuthorizationTicket.peek(token)
        if (ticket.src_did, ticket.dest_did, ticket.vm, ticket.request_digest) != (
                me.did, self.peer_did, request.vm, request.digest()):
            raise TicketTamperedError("Authr_Tkt does not match this request (DIDs, VM or digest)")
        peer = self._trust.verify(self._peer_cert, expected_did=self.peer_did, at=self._clock())
        self._verified_peer = peer
        self.migration_id = check_ident(migration_id or random_bytes(16).hex(), "migration id")
        self.resume_of = None if resume_of is None else check_ident(resume_of, "resume_of")
        self._ephemeral = EphemeralKey.generate(CURVE)
        self._nonce_a = random_bytes(NONCE_SIZE)
        body: dict[str, Any] = {
            "v": VERSION, "t": "mig-req-body", "rqst": request.claims(), "src": me.did,
            "dest": self.peer_did, "user": ticket.user_id, "curve": CURVE,
            "ea": b64e(self._ephemeral.public_bytes()), "nonce_a": b64e(self._nonce_a),
            "time": to_epoch(self._clock()), "mid": self.migration_id,
        }
        if self.resume_of is not None:
            body["resume_of"] = self.resume_of
        signed = jws_sign(body, me.key, typ=REQ_TYP)
        self._signed_request = signed
        sealed = jwe_encrypt(signed.encode("ascii"), peer.public_key)
        self._mig_req = canonical_json({"v": VERSION, "t": "mig-req", "body": sealed, "authr_tkt": token,
                                        "cert": me.cert_pem.decode("ascii")})
        return encode_frame(MIG_REQ, self._mig_req)

    def next_event(self) -> MigrationAccepted | MigrationRefused | object:
        frame = self._next_frame()
        if frame is NEED_DATA:
            return NEED_DATA
        return self._guard(self._on_frame, frame)

    def _on_frame(self, frame: Frame) -> MigrationAccepted | MigrationRefused:
        if frame.type == MIG_REQ:
            self.state = ERROR
            raise ReflectionError("received a MigReq while waiting for MigResp (reflected message)")
        if frame.type != MIG_RESP:
            self.state = ERROR
            raise UnexpectedMessageError(f"frame type 0x{frame.type:02x} while waiting for MigResp")
        if self.state != AWAITING_RESPONSE:
            self._move("receive MigResp ack")  # raises: not waiting for one
        now = self._clock()
        f = _outer(frame.payload, "mig-resp")
        sealed, cert = f.string("body", max_len=CONTROL_MAX), _cert(f)
        f.done()
        known = self._verified_peer
        if cert == self._peer_cert and known is not None and now < known.not_after:
            peer = known  # the certificate we verified moments ago in initiate(); no second chain walk
        else:
            peer = self._trust.verify(cert, expected_did=self.peer_did, at=now)
        token, claims = _open_signed(sealed, self._identity.key, peer, RESP_TYP, REQ_TYP,
                                     "MigResp")
        b = Fields(claims, "MigResp body")
        b.header("mig-resp-body")
        dest, src, status = b.ident("dest"), b.ident("src"), b.choice("status", ("ack", "nack"))
        nonce_a, h_req = b.blob("nonce_a", size=NONCE_SIZE), b.blob("h_req", size=32)
        b.blob("nonce5", size=NONCE_SIZE)
        mid, sent = b.ident("mid"), from_epoch(b.integer("time", 0, MAX_EPOCH))
        eb = b.blob("eb", size=32, optional=True)
        reason = b.string("reason", optional=True, max_len=1024)
        b.done()
        if dest != self.peer_did or src != self._identity.did:
            raise DidMismatchError(f"MigResp is from {dest!r} to {src!r}; expected {self.peer_did!r} "
                                   f"to {self._identity.did!r}")
        if nonce_a != self._nonce_a or mid != self.migration_id or h_req != sha256(self._mig_req):
            raise KeyBindingError("MigResp answers a different MigReq (NonceA, migration id or H(MigReq))")
        if abs((now - sent).total_seconds()) > self._window.total_seconds():
            raise TicketExpiredError(f"MigResp time {sent.isoformat()} is outside the window")
        if status == "nack":
            if eb is not None:
                raise MalformedMessageError("MigResp: a Nack carries no eB")
            self._move("receive MigResp nack")
            return MigrationRefused(mid, reason or "refused", peer, token)
        if eb is None or reason is not None:
            raise MalformedMessageError("MigResp: an Ack carries eB and no reason")
        assert self._ephemeral is not None
        shared = self._ephemeral.exchange(eb)
        self._ephemeral = None
        keys = derive_session_keys(shared, transcript_hash(self._mig_req, frame.payload),
                                   migration_id=mid, src_did=src, dest_did=dest, resume_of=self.resume_of)
        self._move("receive MigResp ack")
        self.keys = keys
        return MigrationAccepted(keys, peer, token)


# --- B: the destination domain ---------------------------------------------------------------------
class DestinationHandshake(_Machine):
    """B's side: feed A's bytes, ``next_event()`` gives MigrationProposed; then ``accept()`` or
    ``refuse(reason)`` returns the MigResp frame (after accept, ``keys`` is set)."""

    _TABLE = DESTINATION_TRANSITIONS

    def __init__(self, identity: Identity, trust: Trust, *, replay_cache: ReplayCache,
                 clock: Clock = utc_now, time_window: timedelta = TIME_WINDOW) -> None:
        super().__init__(AWAITING_REQUEST, clock)
        self._identity, self._trust, self._replay, self._window = identity, trust, replay_cache, time_window
        self._proposal: MigrationProposed | None = None
        self._ea = b""
        self._nonce_a = b""
        self._mig_req = b""
        self.keys: SessionKeys | None = None
        self.signed_response: str | None = None  # our JWS body of MigResp, for the audit ledger

    def next_event(self) -> MigrationProposed | object:
        frame = self._next_frame()
        if frame is NEED_DATA:
            return NEED_DATA
        return self._guard(self._on_frame, frame)

    def _on_frame(self, frame: Frame) -> MigrationProposed:
        if frame.type == MIG_RESP:
            self.state = ERROR
            raise ReflectionError("received a MigResp: a destination only answers (reflected message)")
        if frame.type != MIG_REQ:
            self.state = ERROR
            raise UnexpectedMessageError(f"frame type 0x{frame.type:02x} before the handshake finished")
        me, now = self._identity, self._clock()
        f = _outer(frame.payload, "mig-req")
        sealed = f.string("body", max_len=CONTROL_MAX)
        token = check_token(f.string("authr_tkt", max_len=CONTROL_MAX), "Authr_Tkt", 3)
        cert = _cert(f)
        f.done()
        self._move("receive MigReq")
        self.state = ERROR  # until every check below passed
        peer = self._trust.verify(cert, at=now)
        if peer.did == me.did:
            raise ReflectionError("MigReq comes from this domain's own certificate (reflected)")
        signed, claims = _open_signed(sealed, me.key, peer, REQ_TYP, RESP_TYP, "MigReq")
        b = Fields(claims, "MigReq body")
        b.header("mig-req-body")
        request = MigrationRequest.from_claims(b.raw("rqst"))
        src, dest, user = b.ident("src"), b.ident("dest"), b.ident("user")
        b.choice("curve", (CURVE,))
        ea, nonce_a = b.blob("ea", size=32), b.blob("nonce_a", size=NONCE_SIZE)
        sent, mid = from_epoch(b.integer("time", 0, MAX_EPOCH)), b.ident("mid")
        resume_of = b.ident("resume_of", optional=True)
        b.done()
        if src == me.did:
            raise ReflectionError("MigReq claims to come from this domain (reflected)")
        if src != peer.did:
            raise DidMismatchError(f"MigReq claims Src_DID {src!r} but its certificate is for {peer.did!r}")
        if dest != me.did or request.dest_did != me.did:
            raise DidMismatchError(f"MigReq is for {dest!r}, this domain is {me.did!r}")
        if abs((now - sent).total_seconds()) > self._window.total_seconds():
            raise TicketExpiredError(f"MigReq time {sent.isoformat()} is outside the {self._window} window")
        ticket = AuthorizationTicket.verify(token, peer.public_key, now=now)
        if (ticket.src_did, ticket.dest_did, ticket.user_id, ticket.vm, ticket.request_digest) != (
                src, dest, user, request.vm, request.digest()):
            raise TicketTamperedError("Authr_Tkt does not cover this request (DIDs, user, VM or digest)")
        self._replay.add("MigReq NonceA", nonce_a, sent + self._window)
        self.state = DECIDING
        self._ea, self._nonce_a, self._mig_req = ea, nonce_a, frame.payload
        self._proposal = MigrationProposed(
            migration_id=mid, resume_of=resume_of, src_did=src, user_id=user, request=request,
            authorization=ticket, authorization_token=token, peer=peer, signed_request=signed)
        return self._proposal

    def accept(self) -> bytes:
        """The signed Ack with eB; sets ``keys``."""
        return self._guard(self._answer, None)

    def refuse(self, reason: str) -> bytes:
        """A signed Nack naming ``reason`` (sent to A; keep it free of secrets)."""
        if not isinstance(reason, str) or not 0 < len(reason) <= 1024:
            raise MalformedMessageError("refusal reason must be 1..1024 characters")
        return self._guard(self._answer, reason)

    def _answer(self, reason: str | None) -> bytes:
        self._move("send MigResp nack" if reason else "send MigResp ack")
        p = self._proposal
        assert p is not None
        body: dict[str, Any] = {
            "v": VERSION, "t": "mig-resp-body", "dest": self._identity.did, "src": p.src_did,
            "status": "nack" if reason else "ack", "nonce5": b64e(random_bytes(NONCE_SIZE)),
            "nonce_a": b64e(self._nonce_a), "h_req": b64e(sha256(self._mig_req)), "mid": p.migration_id,
            "time": to_epoch(self._clock()),
        }
        eph = None
        if reason:
            body["reason"] = reason
        else:
            eph = EphemeralKey.generate(CURVE)
            body["eb"] = b64e(eph.public_bytes())
        signed = jws_sign(body, self._identity.key, typ=RESP_TYP)
        sealed = jwe_encrypt(signed.encode("ascii"), p.peer.public_key)
        payload = canonical_json({"v": VERSION, "t": "mig-resp", "body": sealed,
                                  "cert": self._identity.cert_pem.decode("ascii")})
        if eph is not None:
            self.keys = derive_session_keys(
                eph.exchange(self._ea), transcript_hash(self._mig_req, payload), migration_id=p.migration_id,
                src_did=p.src_did, dest_did=self._identity.did, resume_of=p.resume_of)
        self.signed_response = signed
        return encode_frame(MIG_RESP, payload)


# ---- first contact with a pinned peer (before the handshake) -------------------------------------
def certificate_request() -> bytes:
    """A's question to a peer it knows only by a pinned fingerprint: "your certificate?"."""
    return encode_frame(CERT_REQUEST, b'{"v":1}')


def certificate_reply(cert_pem: bytes) -> bytes:
    """B's answer: its domain certificate (public; A checks it against its pin and trust store)."""
    return encode_frame(CERT_REPLY, json.dumps({"v": 1, "cert": cert_pem.decode("ascii")}).encode())


def parse_certificate_reply(frame_type: int, payload: bytes) -> bytes:
    """The certificate PEM of a CertReply frame; MalformedMessageError for anything else."""
    if frame_type != CERT_REPLY:
        raise UnexpectedMessageError(f"frame type 0x{frame_type:02x} instead of a CertReply")
    try:
        body = json.loads(payload)
        cert = body["cert"] if isinstance(body, dict) and body.get("v") == 1 else None
    except (ValueError, KeyError) as exc:
        raise MalformedMessageError("CertReply is not valid JSON") from exc
    if not isinstance(cert, str) or not cert.isascii() or "-----BEGIN CERTIFICATE-----" not in cert:
        raise MalformedMessageError("CertReply carries no PEM certificate")
    return cert.encode("ascii")

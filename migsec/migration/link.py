"""The inter-domain link: the handshake on both sides, and B's decision on a MigReq.

A (blocking, in the VMM agent's thread): ``connect()`` -> SourceSession.
B: ``decide()`` on a verified MigReq -> Accepted (the event loop's half, ``accept_async``, is
``migsec.daemon.endpoint``'s), then the socket goes to a thread.

Handshake frames are read exactly (header, then payload), so no byte of the
record layer that follows is ever consumed here.
"""
from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from migsec.auth.servers import admit_incoming
from migsec.crypto.certs import certificate_fingerprint
from migsec.errors import (
    AuthorizationDenied,
    CertificateError,
    ConfigError,
    HandshakeError,
    JournalError,
    MigsecError,
    PeerUnreachableError,
    UnknownIssuerError,
    network_error,
)
from migsec.migration.channel import ControlLink
from migsec.migration.dataplane import disk_map, request_files
from migsec.migration.peers import split_address
from migsec.pki.ca import load_certificate
from migsec.pki.peers import PinMismatchError
from migsec.protocol import RecordLayer
from migsec.protocol.errors import parse_peer_reason, peer_error_text, refusal_decision
from migsec.protocol.framing import HEADER_SIZE, parse_header
from migsec.protocol.handshake import (
    MigrationAccepted,
    MigrationProposed,
    MigrationRefused,
    SourceHandshake,
    certificate_request,
    parse_certificate_reply,
)

if TYPE_CHECKING:
    from migsec.daemon.services import Services
    from migsec.pki import Peer
    from migsec.protocol.messages import MigrationRequest
    from migsec.protocol.session import SessionKeys

log = logging.getLogger("migsecd.link")
CONNECT_TIMEOUT_S = 15
HANDSHAKE_TIMEOUT_S = 30


@dataclass(frozen=True)
class PeerCert:
    """The peer domain as the handshake verified it, with the certificate PEM (for the ledger)."""

    did: str
    public_key: Any
    cert_pem: bytes


def frame_cert(payload: bytes) -> bytes:
    """The certificate PEM a handshake frame carried (already verified by the handshake)."""
    import json

    return str(json.loads(payload)["cert"]).encode("ascii")


def trust_hint(services: Services) -> str:
    """Where an operator adds a CA this domain should trust (named in untrusted-CA errors)."""
    config = services.config
    stores = ", ".join(str(p) for p in config.domain.trust) or "none"
    return (f"if that CA is to be trusted, append its certificate (PEM) to a file in [domain].trust of "
            f"{config.path} (now: {stores}) and restart migsecd")


# ---- A: the source side -----------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            # a MigReq that fails B's checks gets no answer (nothing can be signed for an
            # unauthenticated peer): say what the usual causes are; B's log has the detail
            raise HandshakeError("the peer closed the connection during the handshake without answering "
                                 "(it did not accept the request: untrusted or revoked certificate, "
                                 "clock skew or a replay; its migsecd log says which)")
        buf += chunk
    return bytes(buf)


@dataclass
class SourceSession:
    """A keyed connection from A to B (after B's Ack)."""

    services: Services
    sock: socket.socket
    keys: SessionKeys
    peer: PeerCert  # B, as verified in the handshake
    records: RecordLayer = field(init=False)
    bytes_on_wire: int = 0
    _control: Any = None

    def __post_init__(self) -> None:
        self.records = RecordLayer(self.keys, "source")

    @property
    def migration_id(self) -> str:
        return self.keys.migration_id

    @property
    def control(self) -> Any:
        if self._control is None:
            self._control = ControlLink(self.sock, self.records, self.keys.dest_did)
        return self._control

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def connect(services: Services, peer: Peer, request: MigrationRequest, token: str, *, migration_id: str,
            resume_of: str | None = None) -> SourceSession:
    """Connect to B and run A's side of the handshake; AuthorizationDenied on B's Nack."""
    if peer.cert_pem is None:
        peer = fetch_pinned_certificate(services, peer)
    assert peer.cert_pem is not None  # fetch_pinned_certificate stored it
    hs = SourceHandshake(services.identity, services.trust, peer_did=peer.did, peer_cert_pem=peer.cert_pem,
                         clock=services.clock)
    try:
        frame = hs.initiate(request, token, migration_id=migration_id, resume_of=resume_of)
    except UnknownIssuerError as exc:
        raise UnknownIssuerError(f"peer {peer.did}: {exc}; {trust_hint(services)}") from exc
    host, port = split_address(peer.address)
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as exc:
        raise PeerUnreachableError(f"cannot connect to {peer.did} at {host}:{port}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        sock.sendall(frame)
        # ledgered once sent: from here B may hold it, whatever B answers (DESIGN §3.4)
        services.audit("mig-req", migration_id, role="source", token=hs.signed_request)
        header = _recv_exact(sock, HEADER_SIZE)
        _, length = parse_header(header)
        payload = _recv_exact(sock, length)
        hs.receive_data(header + payload)
        event = hs.next_event()
    except HandshakeError as exc:
        sock.close()
        raise HandshakeError(f"{peer.did}: {exc}") from exc
    except socket.timeout as exc:
        sock.close()
        raise HandshakeError(f"{peer.did} did not answer the handshake within {HANDSHAKE_TIMEOUT_S} s") from exc
    except OSError as exc:
        sock.close()
        raise network_error(exc, f"handshake with {peer.did} failed") from exc
    except BaseException:
        sock.close()
        raise
    if not isinstance(event, (MigrationAccepted, MigrationRefused)):
        sock.close()
        raise HandshakeError(f"unexpected handshake event {type(event).__name__}")
    peer_cert = PeerCert(event.peer.did, event.peer.public_key, frame_cert(payload))
    if isinstance(event, MigrationRefused):
        sock.close()
        services.audit("mig-resp", migration_id, role="source", outcome="refused", reason=event.reason,
                       peer_token=event.signed_response, peer_cert_pem=peer_cert.cert_pem, peer_did=peer.did)
        # B's reason is a code and a fixed text (its log has the detail): render the code in our words
        code = parse_peer_reason(event.reason)
        raise AuthorizationDenied(f"{peer.did} refused: {peer_error_text(code)}", where="destination",
                                  decision=refusal_decision(code))
    services.audit("mig-resp", migration_id, role="source", outcome="accepted",
                   peer_token=event.signed_response, peer_cert_pem=peer_cert.cert_pem, peer_did=peer.did)
    sock.settimeout(None)
    return SourceSession(services, sock, event.keys, peer_cert)


def fetch_pinned_certificate(services: Services, peer: Peer) -> Peer:
    """First contact with a peer known only by a pinned fingerprint: ask it for its certificate
    (A must encrypt the MigReq to B's key), check it against the pin, the DID and the trust
    store, then store it in the peer directory. Returns the updated peer."""
    if peer.fingerprint is None:
        raise CertificateError(f"peer {peer.did} has neither a certificate nor a pinned fingerprint")
    host, port = split_address(peer.address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as sock:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            sock.sendall(certificate_request())
            frame_type, length = parse_header(_recv_exact(sock, HEADER_SIZE))
            cert_pem = parse_certificate_reply(frame_type, _recv_exact(sock, length))
    except socket.timeout as exc:
        raise HandshakeError(f"{peer.did} did not send its certificate within {HANDSHAKE_TIMEOUT_S} s") from exc
    except OSError as exc:
        raise PeerUnreachableError(f"cannot fetch the certificate of {peer.did} at {host}:{port}: "
                                   f"{exc.strerror or exc}") from exc
    actual = certificate_fingerprint(load_certificate(cert_pem, f"the certificate {peer.did} sent"))
    if actual != peer.fingerprint:
        raise PinMismatchError(f"{peer.did} at {host}:{port} presented certificate {actual}, not the pinned "
                               f"{peer.fingerprint}; nothing was stored (check the fingerprint with the "
                               f"peer's administrator)")
    try:
        services.trust.verify(cert_pem, expected_did=peer.did, at=services.clock())
    except UnknownIssuerError as exc:
        raise UnknownIssuerError(f"peer {peer.did}: {exc}; {trust_hint(services)}") from exc
    stored = services.peers.pin(peer.did, cert_pem)
    services.audit("peer-pinned", None, did=peer.did, fingerprint=actual, address=peer.address, role="source")
    log.info("first contact with %s: certificate %s matched its pin and is stored", peer.did, actual)
    return stored


def store_pinned_source(services: Services, peer: "PeerCert", fingerprint: str) -> None:
    """B's side of a first contact: a source listed by a pinned fingerprint only, whose MigReq
    verified with the pinned certificate, gets that certificate stored."""
    try:
        known = services.peers.get(peer.did)
    except ConfigError:
        return
    if known.cert_pem is not None or known.fingerprint != fingerprint:
        return
    try:
        services.peers.pin(peer.did, peer.cert_pem)
    except MigsecError as exc:
        log.warning("storing the pinned certificate of %s: %s", peer.did, exc)
        return
    services.audit("peer-pinned", None, did=peer.did, fingerprint=fingerprint, role="destination")
    log.info("first contact from %s: certificate %s matched its pin and is stored", peer.did, fingerprint)


# ---- B: the destination side -------------------------------------------------------------------
# the migrations being received, each with the connection that receives it (claimed by B's
# endpoint for the worker thread's life)
_busy: dict[str, socket.socket] = {}
_busy_changed = threading.Condition()
SUPERSEDE_WAIT_S = 30
RESUMABLE_PHASES = ("accepted", "receiving", "received")  # B's journal: a cold transfer A may resume


def active_incoming() -> int:
    """Migrations this daemon is receiving right now (for ``decide``'s ``[limits].max_incoming`` check)."""
    with _busy_changed:
        return len(_busy)


def claim_incoming(migration_id: str, conn: socket.socket, *, supersede: bool = False,
                   wait: float = SUPERSEDE_WAIT_S) -> bool:
    """Mark a migration as being received on ``conn``; False if another connection receives it.

    ``supersede`` (A's authenticated resume of this migration): A gave the old connection up, so
    B's side of it is dead too even where no reset told B (a link that went silent): it is shut
    down, which ends its worker's wait, and the claim waits (``wait`` s) for that worker to let go.
    """
    with _busy_changed:
        old = _busy.get(migration_id)
        if old is not None and supersede:
            log.warning("migration %s: a resume arrived while an older connection still receives it; "
                        "closing that one", migration_id)
            try:
                old.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already: its worker is on its way out
            _busy_changed.wait_for(lambda: migration_id not in _busy, wait)
        if migration_id in _busy:
            return False
        _busy[migration_id] = conn
        return True


def release_incoming(migration_id: str, conn: socket.socket) -> None:
    with _busy_changed:
        if _busy.get(migration_id) is conn:
            del _busy[migration_id]
            _busy_changed.notify_all()


@dataclass
class Accepted:
    """What B hands the data-plane thread after sending its Ack."""

    keys: SessionKeys
    proposal: MigrationProposed
    purpose: str  # "migrate" | "resume" | "recover" | "dry-run"
    peer: PeerCert
    bandwidth: int | None = None
    leftover: bytes = b""

    @property
    def request(self) -> MigrationRequest:
        return self.proposal.request

    @property
    def src_did(self) -> str:
        return self.proposal.src_did

    @property
    def user_id(self) -> str:
        return self.proposal.user_id


def decide(services: Services, proposal: MigrationProposed) -> tuple[str, int | None]:
    """B's decision on a verified MigReq (in a worker thread: policy, libvirt, journal)."""
    _check_pin(services, proposal)
    options = proposal.request.options
    mid = proposal.migration_id
    if proposal.resume_of is not None or options.get("purpose") == "recover":
        try:
            entry = services.journal.get(mid)
        except JournalError as exc:
            raise AuthorizationDenied(f"no migration {mid} to resume or recover here", decision="Invalid") from exc
        if entry.data.get("peer") != proposal.src_did:
            raise AuthorizationDenied(f"migration {mid} does not belong to {proposal.src_did}", decision="Invalid")
        if proposal.resume_of is not None:
            if entry.role != "destination" or proposal.resume_of != mid or \
                    entry.phase not in RESUMABLE_PHASES:
                raise AuthorizationDenied(f"migration {mid} cannot be resumed (it is {entry.phase})", decision="Invalid")
            if proposal.request.require_plan().mode == "live" or entry.plan().mode == "live":
                raise AuthorizationDenied(f"migration {mid} was live: libvirt cannot resume it (start a new one)", decision="Invalid")
            return "resume", None
        return "recover", None
    if options.get("purpose", "migrate") != "migrate":
        raise AuthorizationDenied(f"unknown purpose {options.get('purpose')!r}", decision="Invalid")
    proposal.request.require_plan()  # the VM's facts come only from the signed plan: none, no migration
    try:
        services.journal.get(mid)
    except JournalError:
        pass
    else:
        raise AuthorizationDenied(f"migration id {mid} was used before", decision="Invalid")

    busy, limit = active_incoming(), services.config.limits.max_incoming
    if busy >= limit and not options.get("dry_run"):
        raise AuthorizationDenied(f"{services.did} is receiving {busy} migrations already "
                                  f"([limits].max_incoming = {limit}); try again later",
                                  where="destination", decision="Capacity")
    bandwidth, _ = admit_incoming(services, src_did=proposal.src_did, user_id=proposal.user_id,
                                  request=proposal.request)
    _check_targets_free(services, proposal.request)
    if options.get("dry_run"):
        return "dry-run", bandwidth
    return "migrate", bandwidth


def _check_targets_free(services: Services, request: MigrationRequest) -> None:
    """Refuse before any byte moves when a disk's target here exists already: typically the VM's
    old copy, left when it moved away without --undefinesource and now coming back."""
    import os

    taken = [t for t in disk_map(services, request_files(request)).values() if os.path.lexists(t)]
    if taken:
        vm = request.vm
        raise AuthorizationDenied(
            f"{services.did} already has a file at {', '.join(taken)} (where {vm}'s disk would go): most likely "
            f"{vm}'s old copy, left when it moved away without --undefinesource (a migration never overwrites "
            f"a file). If {vm} does not run at {services.did} and that copy is stale, delete it there (rm "
            f"{' '.join(taken)}; `virsh undefine {vm} --remove-all-storage` also drops the kept definition) and "
            f"migrate again; next time move it with --undefinesource",
            where="destination", decision="Conflict")


def _check_pin(services: Services, proposal: MigrationProposed) -> None:
    """A source listed in B's peer directory must present the certificate recorded there."""
    try:
        known = services.peers.get(proposal.src_did)
    except ConfigError:
        return  # not listed: CA trust and B's policy (source-domain) decide
    if known.fingerprint and known.fingerprint != proposal.peer.fingerprint:
        raise AuthorizationDenied(f"{proposal.src_did} presented certificate {proposal.peer.fingerprint}, "
                                  f"not the one in the peer directory ({known.fingerprint})")

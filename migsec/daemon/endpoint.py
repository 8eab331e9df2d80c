"""B's inter-domain endpoint on migsecd's event loop: the handshake, then a worker thread.

The handshake runs on the event loop with the socket non-blocking (``accept_async``, over
``migsec.migration.link``'s decision and frames); once B has accepted, the socket is switched
to blocking and handed to a worker thread (``run_accepted``) for the data plane (FACTS:
asyncio streams cost ~1.5x the wall time of a blocking socket for bulk data): a new or
resumed migration (``migsec.migration.destination``) or a recovery exchange
(``migsec.migration.recovery``).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

from migsec.errors import AuthorizationDenied, HandshakeError, MigsecError, UnknownIssuerError, network_error
from migsec.migration import link
from migsec.migration.destination import IncomingMigration
from migsec.migration.link import RESUMABLE_PHASES, Accepted, PeerCert, claim_incoming, release_incoming
from migsec.migration.recovery import answer_recovery
from migsec.protocol import NEED_DATA
from migsec.protocol.errors import peer_reason
from migsec.protocol.framing import CERT_REQUEST, HEADER_SIZE, parse_header
from migsec.protocol.handshake import DestinationHandshake, MigrationProposed, certificate_reply

if TYPE_CHECKING:
    from migsec.daemon.services import Services

# the logger names of before the endpoint moved here: operators filter on them
log = logging.getLogger("migsecd.destination")
handshake_log = logging.getLogger("migsecd.link")
HANDSHAKE_TIMEOUT_S = 30


async def serve_peer(daemon: Any, conn: socket.socket, address: Any) -> None:
    """One inter-domain connection: handshake, then a worker thread."""
    loop = asyncio.get_running_loop()
    services = daemon.services
    try:
        try:
            accepted = await asyncio.wait_for(accept_async(services, conn, loop, daemon.executor),
                                              HANDSHAKE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("peer %s: handshake timed out", address[0])
            return
        except MigsecError as exc:
            # a MigReq that fails verification gets no answer: nothing can be signed for an
            # unauthenticated peer; the detail stays in this log
            log.warning("peer %s: handshake failed: %s", address[0], exc)
            return
        if accepted is None:
            return
        conn.setblocking(True)
        await loop.run_in_executor(daemon.executor, run_accepted, services, conn, accepted)
    except Exception:
        log.exception("peer %s: internal error", address[0])
    finally:
        try:
            conn.close()
        except OSError:
            pass


def run_accepted(services: Services, conn: socket.socket, accepted: Accepted) -> None:
    """Thread body for an accepted connection: a new or resumed migration, or a recovery exchange."""
    mid = accepted.keys.migration_id
    if accepted.purpose == "recover":
        answer_recovery(services, conn, accepted)
        return
    if not claim_incoming(mid, conn, supersede=accepted.purpose == "resume"):
        log.warning("migration %s is already being received on another connection", mid)
        return
    try:
        if accepted.purpose == "resume" and (phase := services.journal.get(mid).phase) not in RESUMABLE_PHASES:
            # the connection it superseded got further (its worker ran on until it let go)
            log.warning("migration %s: not resuming, it is %s here now", mid, phase)
            return
        IncomingMigration(services, mid).serve(conn, accepted)
    finally:
        release_incoming(mid, conn)


async def accept_async(services: Services, conn: socket.socket, loop: asyncio.AbstractEventLoop,
                       executor: Any) -> Accepted | None:
    """B's side of the handshake. Returns None when nothing follows (dry run, refusal)."""
    hs = DestinationHandshake(services.identity, services.trust, replay_cache=services.replay,
                              clock=services.clock)

    event: Any = NEED_DATA
    first = True
    while event is NEED_DATA:
        header = await _sock_recv_exact(loop, conn, HEADER_SIZE)
        frame_type, length = parse_header(header)
        payload = await _sock_recv_exact(loop, conn, length)
        if frame_type == CERT_REQUEST and first:
            # a peer that pinned our fingerprint asks for the certificate (public): answer, done
            await _send(loop, conn, certificate_reply(services.identity.cert_pem), "sending the certificate")
            return None
        first = False
        hs.receive_data(header + payload)
        try:
            event = hs.next_event()
        except UnknownIssuerError as exc:
            raise UnknownIssuerError(f"{exc}; {link.trust_hint(services)}") from exc
    if not isinstance(event, MigrationProposed):
        raise HandshakeError(f"unexpected handshake event {type(event).__name__}")
    peer = PeerCert(event.peer.did, event.peer.public_key, link.frame_cert(payload))
    mid = event.migration_id
    services.audit("authr-tkt", mid, role="destination", peer_token=event.authorization_token,
                   peer_cert_pem=peer.cert_pem, peer_did=peer.did)
    services.audit("mig-req", mid, role="destination", peer_token=event.signed_request,
                   peer_cert_pem=peer.cert_pem, peer_did=peer.did)
    # the MigReq verified (signature, CA, DID): a source pinned by fingerprint gets its certificate stored
    await loop.run_in_executor(executor, link.store_pinned_source, services, peer, event.peer.fingerprint)
    try:
        purpose, bandwidth = await loop.run_in_executor(executor, link.decide, services, event)
    except MigsecError as exc:
        # the signed Nack carries a code and a fixed text; the detail stays in this log and ledger
        level = logging.INFO if isinstance(exc, AuthorizationDenied) else logging.WARNING
        handshake_log.log(level, "refusing migration %s from %s: %s", event.migration_id, event.src_did, exc)
        reason = peer_reason(exc)
        await _send(loop, conn, hs.refuse(reason), f"refusing {event.src_did}")
        if isinstance(exc, AuthorizationDenied):
            services.audit("mig-resp", mid, role="destination", token=hs.signed_response,
                           outcome="refused", reason=str(exc)[:1000])
        return None
    await _send(loop, conn, hs.accept(), f"accepting {event.src_did}")
    services.audit("mig-resp", mid, role="destination", token=hs.signed_response,
                   outcome="accepted", purpose=purpose)
    if purpose == "dry-run":
        return None
    assert hs.keys is not None  # accept() derived them
    return Accepted(hs.keys, event, purpose, peer, bandwidth, hs.trailing_data())


async def _send(loop: asyncio.AbstractEventLoop, conn: socket.socket, data: bytes, what: str) -> None:
    try:
        await loop.sock_sendall(conn, data)
    except OSError as exc:
        raise network_error(exc, what) from exc


async def _sock_recv_exact(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await loop.sock_recv(conn, n - len(buf))
        except OSError as exc:
            raise network_error(exc, "receiving the MigReq") from exc
        if not chunk:
            # B is the one waiting for a MigReq here: the causes link's _recv_exact lists are B's own
            raise HandshakeError("the peer closed the connection before its MigReq was complete")
        buf += chunk
    return bytes(buf)

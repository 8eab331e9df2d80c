"""The destination side: the inter-domain endpoint (asyncio) and the incoming migration (thread).

The handshake runs on the event loop with the socket non-blocking; once B has
accepted, the socket is switched to blocking and handed to a worker thread for
the data plane (FACTS: asyncio streams cost ~1.5x the wall time of a blocking
socket for bulk data).

Journal phases at B: accepted -> receiving -> received -> restored-paused
-> commit-received -> resumed -> done; or discarded (only before commit-received).
A connection lost before the decision leaves B's staged files for a resume, and a
paused guest in doubt: it never runs here without A's signed commit.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import threading
from typing import Any

from migsec.errors import DomainNotFoundError, MigsecError

log = logging.getLogger("migsecd.destination")
HANDSHAKE_TIMEOUT_S = 30
DECISION_TIMEOUT_S = 300

_busy: set[str] = set()
_busy_lock = threading.Lock()


async def serve_peer(daemon: Any, conn: socket.socket, address: Any) -> None:
    """One inter-domain connection: handshake, then a worker thread."""
    from migsec.daemon import link

    loop = asyncio.get_running_loop()
    services = daemon.services
    try:
        try:
            accepted = await asyncio.wait_for(link.accept_async(services, conn, loop, daemon.executor),
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


def run_accepted(services: Any, conn: socket.socket, accepted: Any) -> None:
    """Thread body for an accepted connection: a new or resumed migration, or a recovery exchange."""
    mid = accepted.keys.migration_id
    if accepted.purpose == "recover":
        from migsec.daemon.recovery import answer_recovery

        answer_recovery(services, conn, accepted)
        return
    with _busy_lock:
        if mid in _busy:
            log.warning("migration %s is already being received on another connection", mid)
            return
        _busy.add(mid)
    try:
        IncomingMigration(services, mid).serve(conn, accepted)
    finally:
        with _busy_lock:
            _busy.discard(mid)


class IncomingMigration:
    """B's side of one migration: receive, verify, restore paused, receipt, decision."""

    def __init__(self, services: Any, migration_id: str) -> None:
        self.services = services
        self.mid = migration_id

    def serve(self, conn: socket.socket, accepted: Any) -> None:
        from migsec.daemon import dataplane
        from migsec.daemon.channel import ControlLink
        from migsec.protocol import RecordLayer

        request = accepted.request
        if accepted.purpose == "migrate":
            self.journal("accepted", domain=request.vm, peer=accepted.src_did, user=accepted.user_id,
                         options=dict(request.options), staging=str(dataplane.staging_dir(self.services, self.mid)))
        records = RecordLayer(accepted.keys, "destination")
        if accepted.leftover:
            raise MigsecError("bytes after MigReq before the answer: refusing the session")
        control = ControlLink(conn, records, accepted.src_did)
        try:
            self.journal("receiving", attempt_from=accepted.purpose)
            received = dataplane.receive(self.services, conn, records, request, self.mid)
            self.journal("received", manifest_sha256=received.manifest_digest)
            name = self.restore(received.memory_path, received.restore_xml)
            receipt = self.sign_receipt(received.manifest_digest, name)
            control.send_control({"type": "receipt", "token": receipt})
            message = control.recv_control(DECISION_TIMEOUT_S)
        except (ConnectionError, OSError) as exc:
            log.warning("migration %s: connection lost (%s); keeping state for a resume or recovery", self.mid, exc)
            return
        except MigsecError as exc:
            if _connection_lost(exc):
                log.warning("migration %s: connection lost (%s); keeping state for a resume or recovery",
                            self.mid, exc)
                return
            log.error("migration %s failed at the destination: %s", self.mid, exc)
            self.discard(f"failed at the destination: {exc}")
            try:
                control.send_control({"type": "abort", "reason": str(exc)[:500]})
            except (MigsecError, ConnectionError):
                pass
            return
        try:
            reply = self.apply_decision(message, accepted.peer)
            control.send_control(reply)
        except (MigsecError, ConnectionError) as exc:
            log.error("migration %s: decision handling: %s", self.mid, exc)

    # ---- phases (each idempotent: recovery calls them again) -------------------------------
    def restore(self, memory_path: str, xml: str) -> str:
        from migsec import virt

        with virt.connect(self.services.config.libvirt.uri) as conn:
            name = virt.restore_domain(conn, memory_path, xml=xml, paused=True)
        self.journal("restored-paused", restored=name)
        log.info("migration %s: %s restored paused", self.mid, name)
        return name

    def sign_receipt(self, manifest_digest: str, name: str) -> str:
        from migsec.daemon.link import sign_message

        receipt = sign_message(self.services, "receipt", migration_id=self.mid, outcome="restored-paused",
                               domain=name, manifest_sha256=manifest_digest)
        self.services.audit("receipt", self.mid, role="destination", token=receipt)
        return receipt

    def apply_decision(self, message: dict, peer: Any) -> dict:
        """Act on A's signed decision; returns the reply for A."""
        from migsec.daemon.link import sign_message, verify_peer_message
        from migsec.errors import ProtocolError

        if message.get("type") != "decision":
            raise ProtocolError(f"expected the source's decision, got {message.get('type')!r}")
        claims = verify_peer_message(message.get("token"), peer.public_key, issuer=peer.did, kind="decision",
                                     migration_id=self.mid)
        self.services.audit("decision", self.mid, role="destination", outcome=claims.get("outcome"),
                            peer_token=message["token"], peer_cert_pem=peer.cert_pem, peer_did=peer.did)
        if claims.get("outcome") != "commit":
            self.discard(f"the source decided {claims.get('outcome')!r}")
            return {"type": "discarded"}
        entry = self.services.journal.get(self.mid)
        if entry.phase == "discarded":
            raise ProtocolError(f"migration {self.mid} was discarded here; cannot commit")
        name = self.finish_commit()
        resumed = sign_message(self.services, "resumed", migration_id=self.mid, domain=name)
        self.services.audit("resumed", self.mid, role="destination", token=resumed)
        return {"type": "resumed", "token": resumed}

    def finish_commit(self) -> str:
        """After the commit decision: the guest must run here."""
        from migsec import virt
        from migsec.daemon import dataplane

        entry = self.services.journal.get(self.mid)
        if entry.phase != "done":
            self.journal("commit-received")
        name = str(entry.data.get("restored") or entry.data.get("domain"))
        options = dict(entry.data.get("options") or {})
        with virt.connect(self.services.config.libvirt.uri) as conn:
            state = virt.domain_state(conn, name).value
            if state == "paused":
                virt.resume_domain(conn, name)
            if options.get("persistent"):
                virt.define_domain(conn, virt.domain_xml(conn, name))
        if entry.phase != "done":
            self.journal("resumed")
            shutil.rmtree(dataplane.staging_dir(self.services, self.mid), ignore_errors=True)
            self.journal("done")
        log.info("migration %s: %s resumed here", self.mid, name)
        return name

    def discard(self, reason: str) -> None:
        """Before the commit decision: remove any paused copy and every partial file."""
        from migsec import virt
        from migsec.daemon import dataplane

        entry = self.services.journal.get(self.mid)
        if entry.decided:
            raise MigsecError(f"migration {self.mid} is committed here; refusing to discard it")
        name = entry.data.get("restored")
        if name:
            with virt.connect(self.services.config.libvirt.uri) as conn:
                try:
                    if virt.domain_state(conn, name).active:
                        virt.destroy_domain(conn, name)
                except DomainNotFoundError:
                    pass
        dataplane.discard(self.services, self.mid)
        if entry.phase != "discarded":
            self.journal("discarded", reason=reason)
        log.info("migration %s: discarded (%s)", self.mid, reason)

    def journal(self, phase: str, **fields: Any) -> None:
        from migsec.daemon.jobs import record

        record(self.services, self.mid, "destination", phase, **fields)


def _connection_lost(exc: BaseException) -> bool:
    from migsec.errors import TruncatedStreamError
    from migsec.transfer.plane import PeerConnectionError

    return isinstance(exc, (PeerConnectionError, TruncatedStreamError))

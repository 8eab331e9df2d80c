"""The destination side: the inter-domain endpoint (asyncio) and the incoming migration (thread).

The handshake runs on the event loop with the socket in non-blocking mode; once
B has accepted, the socket is switched to blocking and handed, with any bytes
already read past the handshake, to a worker thread for the data plane
(FACTS: asyncio streams cost ~1.5x the wall time of a blocking socket for bulk).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

from migsec.errors import (
    AuthorizationDenied,
    MigrationFailed,
    MigsecError,
    ProtocolError,
)

log = logging.getLogger("migsecd.destination")
HANDSHAKE_TIMEOUT_S = 30
DECISION_TIMEOUT_S = 120

# migration id -> IncomingMigration: lets a resumed or recovery connection find the
# state of the migration it names
_incoming: dict[str, "IncomingMigration"] = {}
_incoming_lock = threading.Lock()


async def serve_peer(daemon: Any, conn: socket.socket, address: Any) -> None:
    """One inter-domain connection: handshake, then the data plane in a thread."""
    from migsec.daemon import link

    loop = asyncio.get_running_loop()
    services = daemon.services
    try:
        try:
            accepted = await asyncio.wait_for(link.accept_async(services, conn, loop, daemon.executor),
                                              HANDSHAKE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("peer %s: handshake timed out", address[0])
            conn.close()
            return
        except MigsecError as exc:
            # the reason went to the peer in a signed refusal when possible; details stay here
            log.warning("peer %s: refused: %s", address[0], exc)
            conn.close()
            return
        if accepted is None:  # dry run or refusal already answered
            conn.close()
            return
        conn.setblocking(True)
        await loop.run_in_executor(daemon.executor, run_incoming, services, conn, accepted)
    except Exception:
        log.exception("peer %s: internal error", address[0])
        conn.close()


def run_incoming(services: Any, conn: socket.socket, accepted: Any) -> None:
    """Thread body for an accepted connection: a new migration, a resume or a recovery query."""
    mid = accepted.keys.migration_id
    try:
        if accepted.purpose == "recover":
            from migsec.daemon.recovery import answer_peer_query

            answer_peer_query(services, conn, accepted)
            return
        with _incoming_lock:
            job = _incoming.get(mid)
            if job is None:
                job = IncomingMigration(services, accepted)
                _incoming[mid] = job
        job.attach(conn, accepted)
    finally:
        try:
            conn.close()
        except OSError:
            pass


class IncomingMigration:
    """B's side of one migration: receive, verify, restore paused, receipt, await decision."""

    def __init__(self, services: Any, accepted: Any) -> None:
        self.services = services
        self.mid = accepted.keys.migration_id
        self.accepted = accepted
        self.request = accepted.request
        self.staging_dir = Path(services.config.paths.staging_dir) / f"in-{self.mid}"
        self.lock = threading.Lock()
        self.restored_name: str | None = None
        self.journal("accepted", domain=self.request.vm, peer=accepted.src_did,
                     user=accepted.user_id, staging=str(self.staging_dir),
                     options=dict(self.request.options))
        services.audit("mig-req", migration_id=self.mid, role="destination", token=accepted.audit_token)

    def attach(self, conn: socket.socket, accepted: Any) -> None:
        """Serve one connection (the first, or a resume after the previous one broke)."""
        from migsec.daemon import dataplane
        from migsec.daemon.link import PeerChannel

        if not self.lock.acquire(timeout=5):
            raise ProtocolError(f"migration {self.mid} is already being served on another connection")
        try:
            channel = PeerChannel(conn, accepted.keys, "destination", accepted.leftover)
            try:
                received = dataplane.receive(self.services, channel, self)
                if received is None:
                    return
                self.install_and_restore(received)
                self.await_decision(channel)
            except (OSError, ProtocolError) as exc:
                # connection lost: staged data stays for a resume; an in-doubt guest stays paused
                log.warning("migration %s: connection lost: %s", self.mid, exc)
            except MigsecError as exc:
                log.error("migration %s failed at the destination: %s", self.mid, exc)
                self.discard(str(exc))
                try:
                    channel.send_control({"type": "abort", "reason": str(exc)})
                except (OSError, MigsecError):
                    pass
        finally:
            self.lock.release()

    # ---- phases --------------------------------------------------------------------------
    def install_and_restore(self, received: Any) -> None:
        from migsec import virt

        conn = virt.connect(self.services.config.libvirt.uri)
        try:
            xml = received.restore_xml
            self.restored_name = virt.restore_domain(conn, received.memory_path, xml=xml, paused=True)
        finally:
            conn.close()
        self.journal("restored-paused", restored=self.restored_name)

    def await_decision(self, channel: Any) -> None:
        from migsec.daemon.link import sign_message

        receipt = sign_message(self.services, "receipt", migration_id=self.mid, outcome="restored-paused",
                               streams=self.streams_summary)
        self.services.audit("receipt", migration_id=self.mid, role="destination", token=receipt)
        channel.send_control({"type": "receipt", "token": receipt})
        message = channel.recv_control(timeout=DECISION_TIMEOUT_S)
        self.apply_decision(message, channel)

    def apply_decision(self, message: dict, channel: Any | None) -> str:
        """Act on A's signed decision; returns the outcome."""
        from migsec.daemon.link import sign_message, verify_peer_message

        if message.get("type") != "decision":
            raise ProtocolError(f"expected the source's decision, got {message.get('type')!r}")
        claims = verify_peer_message(self.services, message.get("token"), self.accepted.src_did,
                                     kind="decision", migration_id=self.mid)
        self.services.audit("decision", migration_id=self.mid, role="destination", token=message["token"])
        if claims.get("outcome") != "commit":
            self.discard(f"source decided {claims.get('outcome')}")
            return "discarded"
        self.journal("commit-received")
        outcome = self.finish_commit()
        resumed = sign_message(self.services, "resumed", migration_id=self.mid, domain=self.restored_name)
        self.services.audit("resumed", migration_id=self.mid, role="destination", token=resumed)
        if channel is not None:
            channel.send_control({"type": "resumed", "token": resumed})
        return outcome

    def finish_commit(self) -> str:
        """After commit-received: the guest must run here (idempotent, used by recovery too)."""
        from migsec import virt

        conn = virt.connect(self.services.config.libvirt.uri)
        try:
            name = self.restored_name or self.request.vm
            state = virt.domain_state(conn, name).value
            if state == "paused":
                virt.resume_domain(conn, name)
            if self.request.options.get("persistent"):
                xml = virt.domain_xml(conn, name, migratable=True)
                virt.define_domain(conn, xml)
        finally:
            conn.close()
        self.journal("resumed")
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        self.journal("done")
        with _incoming_lock:
            _incoming.pop(self.mid, None)
        return "resumed"

    def discard(self, reason: str) -> None:
        """Before commit-received: remove any paused copy and every partial file."""
        from migsec import virt
        from migsec.errors import DomainNotFoundError

        conn = virt.connect(self.services.config.libvirt.uri)
        try:
            if self.restored_name:
                try:
                    state = virt.domain_state(conn, self.restored_name)
                    if state.active:
                        virt.destroy_domain(conn, self.restored_name)
                except DomainNotFoundError:
                    pass
        finally:
            conn.close()
        from migsec.daemon import dataplane

        dataplane.discard_files(self.services, self)
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        self.journal("discarded", reason=reason)
        with _incoming_lock:
            _incoming.pop(self.mid, None)

    streams_summary: list = []

    def journal(self, phase: str, **fields: Any) -> None:
        from migsec.daemon.jobs import record

        record(self.services, self.mid, "destination", phase, **fields)


def incoming(mid: str) -> IncomingMigration | None:
    with _incoming_lock:
        return _incoming.get(mid)

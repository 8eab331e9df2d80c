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
from typing import TYPE_CHECKING, Any

from migsec.errors import DomainNotFoundError, MigsecError
from migsec.protocol.errors import peer_reason

if TYPE_CHECKING:
    from migsec.daemon.link import Accepted
    from migsec.daemon.services import Services

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


def active_incoming() -> int:
    """Migrations this daemon is receiving right now."""
    with _busy_lock:
        return len(_busy)


def run_accepted(services: Services, conn: socket.socket, accepted: Accepted) -> None:
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
    """B's side of one migration: receive, verify, restore paused, receipt, decision.

    The commit exchange itself is ``migsec.transfer.commit.DestinationCommit``; this class
    gives it the hypervisor actions and the journal, and moves its messages.
    """

    def __init__(self, services: Services, migration_id: str) -> None:
        self.services = services
        self.mid = migration_id

    def serve(self, conn: socket.socket, accepted: Accepted) -> None:
        from migsec.daemon import dataplane
        from migsec.daemon.channel import ControlLink
        from migsec.protocol import RecordLayer
        from migsec.transfer.commit import DestinationCommit, as_control

        services, request = self.services, accepted.request
        if accepted.purpose == "migrate":
            self.journal("accepted", domain=request.vm, peer=accepted.src_did, user=accepted.user_id,
                         options=dict(request.options), staging=str(dataplane.staging_dir(services, self.mid)),
                         bandwidth=accepted.bandwidth)
        bandwidth = accepted.bandwidth or services.journal.get(self.mid).data.get("bandwidth")
        if accepted.leftover:
            raise MigsecError("bytes after MigReq before the answer: refusing the session")
        if request.mode == "live":
            from migsec.daemon.live import serve_destination

            serve_destination(self, conn, accepted)
            return
        records = RecordLayer(accepted.keys, "destination")
        control = ControlLink(conn, records, accepted.src_did)
        prepared: dict[str, str] = {}
        commit = DestinationCommit(
            migration_id=self.mid, src_did=accepted.src_did, dest_did=services.did,
            transcript_hash=accepted.keys.transcript_hash, key=services.identity.key,
            peer_key=accepted.peer.public_key, journal=self.journal,
            restore_paused=lambda: self.restore(prepared["memory"], prepared["xml"]),
            resume_vm=self.resume_here, discard=self.discard_here, clock=services.clock)
        try:
            self.journal("receiving", attempt=accepted.purpose)
            received = dataplane.receive(services, conn, records, request, self.mid, bandwidth=bandwidth)
            prepared.update(memory=received.memory_path, xml=received.restore_xml)
            commit.streams_verified(received.manifest, received.manifest_json)
            receipt = commit.restore()  # restores paused, signs, journals restored-paused
        except (MigsecError, OSError) as exc:  # an OSError here is local (a disk): final, not a break
            if _connection_lost(exc):
                log.warning("migration %s: connection lost (%s); staged data kept for a resume",
                            self.mid, exc)
                return
            log.error("migration %s failed at the destination: %s", self.mid, exc)
            if commit.state not in ("DISCARDED", "IN_DOUBT"):
                commit.fail(str(exc))  # before the receipt: remove everything
            _send_quietly(control, {"t": "abort", "reason": peer_reason(exc)})  # the detail: logged above
            return
        services.audit("receipt", self.mid, role="destination", token=receipt)
        try:
            control.send_control(as_control("receipt", receipt))
            message = control.recv_control(DECISION_TIMEOUT_S)
            token = message.get("jws")
            if message.get("t") != "decision" or not isinstance(token, str):
                raise MigsecError(f"expected the source's decision, got {message.get('t')!r}")
            services.audit("decision", self.mid, role="destination", peer_token=token,
                           peer_cert_pem=accepted.peer.cert_pem, peer_did=accepted.src_did)
            resumed = commit.decision_received(token)
        except MigsecError as exc:
            commit.fail(str(exc))  # after the receipt: in doubt, the guest stays paused
            log.warning("migration %s: no decision from %s (%s); the guest stays paused until "
                        "`migsec recover` learns it", self.mid, accepted.src_did, exc)
            return
        if resumed is None:
            log.info("migration %s: %s decided abort; discarded", self.mid, accepted.src_did)
            return
        services.audit("resumed", self.mid, role="destination", token=resumed)
        _send_quietly(control, as_control("resumed", resumed))
        self.finish()

    # ---- the hypervisor actions the commit machine calls ---------------------------------
    def restore(self, memory_path: str, xml: str) -> None:
        from migsec import virt

        with virt.connect(self.services.config.libvirt.uri) as conn:
            name = virt.restore_domain(conn, memory_path, xml=xml, paused=True)
        self.journal("received", restored=name)
        log.info("migration %s: %s restored paused", self.mid, name)

    def resume_here(self) -> None:
        """After the commit decision: the guest must run here (idempotent)."""
        from migsec import virt

        entry = self.services.journal.get(self.mid)
        from migsec.daemon.live import is_live, resume_destination

        if is_live(entry):  # libvirt's Finish left it paused (and persisted it if asked)
            resume_destination(self.services, self.mid)
            return
        name = str(entry.data.get("restored") or entry.data.get("domain"))
        options = dict(entry.data.get("options") or {})
        with virt.connect(self.services.config.libvirt.uri) as conn:
            if virt.domain_state(conn, name).value == "paused" and not options.get("paused"):
                virt.resume_domain(conn, name)
            if options.get("persistent"):
                virt.define_domain(conn, virt.domain_xml(conn, name))
            self._clear_given_away(conn, name)
        log.info("migration %s: %s resumed here", self.mid, name)

    def _clear_given_away(self, conn: Any, name: str) -> None:
        """The guest came back to a host that kept its definition: that definition runs it
        again, so it is no longer given away (the hook would refuse its next start)."""
        from migsec import virt

        try:
            mark = virt.clear_moved(conn, name)
        except MigsecError as exc:
            log.error("migration %s: cannot clear the given-away mark of %s: %s (run `migsec release %s`)",
                      self.mid, name, exc, name)
            return
        if mark is not None:
            log.info("migration %s: %s is back; cleared the mark of migration %s", self.mid, name,
                     mark.migration_id)
            self.services.audit("vm-returned", self.mid, role="destination", domain=name,
                                given_away_by=mark.migration_id)

    def discard_here(self) -> None:
        """Before the commit decision: remove any paused copy and every partial file."""
        from migsec import virt
        from migsec.daemon import dataplane

        entry = self.services.journal.get(self.mid)
        if entry.decided:
            raise MigsecError(f"migration {self.mid} is committed here; refusing to discard it")
        from migsec.daemon.live import discard_destination, is_live

        if is_live(entry):  # A's signed abort: the paused copy libvirt's Finish left is destroyed
            discard_destination(self.services, self.mid, aborted=True, record_phase=False)
            return
        name = entry.data.get("restored")
        if name:
            with virt.connect(self.services.config.libvirt.uri) as conn:
                try:
                    if virt.domain_state(conn, name).active:
                        virt.destroy_domain(conn, name)
                except DomainNotFoundError:
                    pass
        dataplane.discard(self.services, self.mid)

    def finish(self) -> None:
        from migsec.daemon import dataplane

        shutil.rmtree(dataplane.staging_dir(self.services, self.mid), ignore_errors=True)
        if self.services.journal.get(self.mid).phase != "done":
            self.journal("done")

    # ---- recovery (the commit machine's state is rebuilt from the journal) ------------------
    def apply_decision(self, message: dict, peer: Any) -> dict:
        """Act on A's signed decision outside a live session; returns the reply for A."""
        from migsec.protocol import Decision, Resumed, token_hash

        token = message.get("jws")
        if message.get("t") != "decision" or not isinstance(token, str):
            raise MigsecError(f"expected the source's decision, got {message.get('t')!r}")
        decision = Decision.verify(token, peer.public_key, migration_id=self.mid)
        if (decision.src_did, decision.dest_did) != (peer.did, self.services.did):
            raise MigsecError(f"decision is between {decision.src_did} and {decision.dest_did}")
        self.services.audit("decision", self.mid, role="destination", peer_token=token,
                            peer_cert_pem=peer.cert_pem, peer_did=peer.did)
        entry = self.services.journal.get(self.mid)
        if decision.decision == "abort":
            if entry.phase != "discarded":
                self.discard_here()
                self.journal("discarded", decision=token)
            return {"t": "discarded"}
        if entry.phase == "discarded":
            raise MigsecError(f"migration {self.mid} was discarded here; cannot commit")
        receipt = entry.data.get("receipt")
        if not receipt or decision.receipt_hash != token_hash(receipt):
            raise MigsecError("commit decision names a receipt this domain did not issue")
        if not entry.decided:
            self.journal("commit-received", decision=token)
        self.resume_here()
        resumed = entry.data.get("resumed") or Resumed(
            migration_id=self.mid, src_did=peer.did, dest_did=self.services.did,
            decision_hash=token_hash(token), issued_at=self.services.clock()).sign(self.services.identity.key)
        if self.services.journal.get(self.mid).phase == "commit-received":
            self.journal("resumed", resumed=resumed)
            self.services.audit("resumed", self.mid, role="destination", token=resumed)
        self.finish()
        return {"t": "resumed", "jws": resumed}

    def journal(self, phase: str, **fields: Any) -> None:
        from migsec.daemon.jobs import record

        record(self.services, self.mid, "destination", phase, **fields)


def _send_quietly(control: Any, message: dict) -> None:
    try:
        control.send_control(message)
    except MigsecError:
        pass


def _connection_lost(exc: BaseException) -> bool:
    from migsec.errors import RESUMABLE

    return isinstance(exc, RESUMABLE)

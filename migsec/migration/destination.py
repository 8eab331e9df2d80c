"""The destination side: the incoming migration, in the worker thread B's endpoint
(``migsec.daemon.endpoint``: the handshake on the event loop) hands an accepted socket to.

Journal phases at B: accepted -> receiving -> received -> restored-paused
-> commit-received -> resumed -> done; or discarded (only before commit-received).
``migsec.transfer.commit.DestinationCommit`` writes them all and applies A's decision, in
the session and when recovery brings it (``decision_from_source``), cold and live (a live
move's "received" is libvirt's Finish, with a first receipt: ``migsec.migration.live``).
A connection lost before the decision leaves B's staged files for a resume, and a
paused guest in doubt: it never runs here without A's signed commit.
"""
from __future__ import annotations

import logging
import shutil
import socket
from typing import TYPE_CHECKING, Any

from migsec import virt
from migsec.crypto import VerifyingKey
from migsec.errors import RESUMABLE, DomainNotFoundError, MigsecError
from migsec.migration import dataplane
from migsec.migration.channel import ControlLink
from migsec.migration.jobs import record
from migsec.migration.live import discard_destination, is_live, resume_destination, serve_destination
from migsec.protocol import RecordLayer
from migsec.protocol.errors import peer_reason
from migsec.transfer import SourceDecision
from migsec.transfer.commit import (
    AWAIT_DECISION,
    COLD_RECEIPT,
    COMMITTED,
    DISCARDED,
    FINISHED_PAUSED,
    IN_DOUBT,
    LIVE_RECEIPT,
    RUNNING,
    DestinationCommit,
    as_control,
)

if TYPE_CHECKING:
    from migsec.migration.link import Accepted
    from migsec.daemon.services import Services

log = logging.getLogger("migsecd.destination")
DECISION_TIMEOUT_S = 300

class IncomingMigration:
    """B's side of one migration: receive, verify, restore paused, receipt, decision.

    The commit exchange itself is ``migsec.transfer.commit.DestinationCommit``; this class
    gives it the hypervisor actions and the journal, and moves its messages.
    """

    def __init__(self, services: Services, migration_id: str) -> None:
        self.services = services
        self.mid = migration_id
        self.restored: str | None = None  # the restored domain's name, before it is journaled
        # live: a libvirt connection the flow holds open for the resume, and its timeline
        self.held_conn: Any = None
        self.timing: dict[str, float] | None = None

    def machine_from_journal(self, peer_key: VerifyingKey | None) -> DestinationCommit:
        """B's commit machine as this migration's journal left it (recovery, A's answer)."""
        def no_restore() -> None:
            raise MigsecError(f"migration {self.mid}: nothing to restore outside the session")

        return DestinationCommit.from_journal(
            self.services.journal.get(self.mid), dest_did=self.services.did, key=self.services.identity.key,
            peer_key=peer_key, journal=self.journal, restore_paused=no_restore, resume_vm=self.resume_here,
            discard=self.discard_here, cleanup=self.cleanup, clock=self.services.clock)

    def serve(self, conn: socket.socket, accepted: Accepted) -> None:
        services, request = self.services, accepted.request
        prepared: dict[str, str] = {}
        live = request.mode == "live"
        # live: libvirt's Finish is the restore (finished_paused); a local failure only waits for
        # libvirt to drop an unfinished guest, A's abort destroys the paused copy (discard_here)
        commit = DestinationCommit(
            migration_id=self.mid, src_did=accepted.src_did, dest_did=services.did,
            transcript_hash=accepted.keys.transcript_hash, key=services.identity.key,
            peer_key=accepted.peer.public_key, journal=self.journal,
            restore_paused=lambda: self.restore(prepared["memory"], prepared["xml"]),
            resume_vm=self.resume_here, discard=self.drop_unfinished if live else self.discard_here,
            discard_on_abort=self.discard_here, cleanup=self.cleanup, clock=services.clock,
            receipt_state=LIVE_RECEIPT if live else COLD_RECEIPT)
        if accepted.purpose == "migrate":
            commit.accepted(domain=request.vm, peer=accepted.src_did, user=accepted.user_id,
                            options=dict(request.options), plan=request.require_plan().to_dict(),
                            staging=str(dataplane.staging_dir(services, self.mid)),
                            bandwidth=accepted.bandwidth)
        bandwidth = accepted.bandwidth or services.journal.get(self.mid).data.get("bandwidth")
        if accepted.leftover:
            raise MigsecError("bytes after MigReq before the answer: refusing the session")
        if request.mode == "live":
            serve_destination(self, conn, accepted, commit)
            return
        records = RecordLayer(accepted.keys, "destination")
        control = ControlLink(conn, records, accepted.src_did)
        try:
            commit.receiving(attempt=accepted.purpose)
            received = dataplane.receive(services, conn, records, request, self.mid, bandwidth=bandwidth)
            prepared.update(memory=received.memory_path, xml=received.restore_xml)
            # the name goes into the journal before the restore can create the paused copy
            commit.streams_verified(received.manifest, received.manifest_json,
                                    restoring=self.restore_target(received.restore_xml))
            receipt = commit.restore()  # restores paused, signs, journals restored-paused
        except SourceDecision as exc:  # A gave up while the streams flowed: its signed abort
            self._decided_while_receiving(commit, exc.token, accepted)
            return
        except (MigsecError, OSError) as exc:  # an OSError here is local (a disk): final, not a break
            if _connection_lost(exc):
                log.warning("migration %s: connection lost (%s); staged data kept for a resume",
                            self.mid, exc)
                return
            log.error("migration %s failed at the destination: %s", self.mid, exc)
            if commit.state not in (DISCARDED, IN_DOUBT):
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
        commit.finish()

    def _decided_while_receiving(self, commit: DestinationCommit, token: str, accepted: Accepted) -> None:
        """A's decision came inside the data session: audited and fed to the machine like any
        other (an abort discards and is journaled with its token); one that does not verify,
        or a commit (nothing was receipted), fails the machine, which discards all the same."""
        try:
            self.services.audit("decision", self.mid, role="destination", peer_token=token,
                                peer_cert_pem=accepted.peer.cert_pem, peer_did=accepted.src_did)
            commit.decision_received(token)
        except MigsecError as exc:
            log.error("migration %s: refused the decision %s sent while receiving: %s", self.mid,
                      accepted.src_did, exc)
            if commit.state not in (DISCARDED, IN_DOUBT):
                commit.fail(f"refused the source's decision while receiving: {exc}")
            return
        log.info("migration %s: %s decided abort while sending; discarded", self.mid, accepted.src_did)

    # ---- the hypervisor actions the commit machine calls ---------------------------------
    def restore_target(self, xml: str) -> str:
        """The name the guest will be restored under (B's mapped XML). A domain of that name
        that runs (or is paused) here already is refused now: a discard of this migration, which
        destroys a paused copy found under the name, must never touch another guest."""
        name = virt.restore_name(xml)
        with virt.connect(self.services.config.libvirt.uri) as conn:
            try:
                active = virt.domain_state(conn, name).active
            except DomainNotFoundError:
                active = False
        if active:
            raise MigsecError(f"a domain named {name!r} is already active here; refusing to restore over it")
        return name

    def restore(self, memory_path: str, xml: str) -> dict:
        """Restore paused; returns what the machine journals with "restored-paused"."""
        with virt.connect(self.services.config.libvirt.uri) as conn:
            self.restored = name = virt.restore_domain(conn, memory_path, xml=xml, paused=True)
        log.info("migration %s: %s restored paused", self.mid, name)
        return {"restored": name}

    def resume_here(self) -> None:
        """After the commit decision: the guest must run here (idempotent)."""
        entry = self.services.journal.get(self.mid)
        if is_live(entry):  # libvirt's Finish left it paused (and persisted it if asked)
            resume_destination(self.services, self.mid, self.timing, conn=self.held_conn)
            return
        name = str(entry.data.get("restored") or entry.data.get("domain"))
        options = dict(entry.data.get("options") or {})
        with virt.connect(self.services.config.libvirt.uri) as conn:
            if virt.domain_state(conn, name).value == "paused" and not entry.plan().paused:
                virt.resume_domain(conn, name)
            if options.get("persistent"):
                virt.define_domain(conn, virt.domain_xml(conn, name))
            self._clear_given_away(conn, name)
        log.info("migration %s: %s resumed here", self.mid, name)

    def _clear_given_away(self, conn: Any, name: str) -> None:
        """The guest came back to a host that kept its definition: that definition runs it
        again, so it is no longer given away (the hook would refuse its next start)."""
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
        entry = self.services.journal.get(self.mid)
        if entry.decided:
            raise MigsecError(f"migration {self.mid} is committed here; refusing to discard it")
        if is_live(entry):  # A's signed abort: the paused copy libvirt's Finish left is destroyed
            discard_destination(self.services, self.mid, aborted=True)
            return
        name = entry.data.get("restored") or self.restored  # restored, but not yet journaled
        target = name or entry.data.get("restoring")
        if target:
            with virt.connect(self.services.config.libvirt.uri) as conn:
                try:
                    state = virt.domain_state(conn, target)
                except DomainNotFoundError:
                    state = None
                # after the restore whatever is active under its name is this migration's copy;
                # under the name journaled before it (a crash may have come between the restore
                # and "restored-paused") only a paused one is: restore_target refused the name
                # while anything else was active under it
                if state is not None and (state.active if name else state.value == "paused"):
                    virt.destroy_domain(conn, target)
        dataplane.discard(self.services, self.mid)

    def drop_unfinished(self) -> None:
        """Live, a local failure before libvirt's Finish: wait for libvirt to drop the unfinished
        incoming guest (a guest still here may be the only copy: never removed), then remove
        B's pre-created disks and sockets."""
        discard_destination(self.services, self.mid)

    def cleanup(self) -> None:
        """The guest runs here: the staging directory goes."""
        shutil.rmtree(dataplane.staging_dir(self.services, self.mid), ignore_errors=True)

    # ---- A's decision outside the session (recovery): fed to the machine rebuilt from the journal ----
    def decision_from_source(self, message: dict, peer: Any) -> dict:
        """A's signed decision, brought by a recovery conversation; returns the reply for A."""
        token = message.get("jws")
        if message.get("t") != "decision" or not isinstance(token, str):
            raise MigsecError(f"expected the source's decision, got {message.get('t')!r}")
        self.services.audit("decision", self.mid, role="destination", peer_token=token,
                            peer_cert_pem=peer.cert_pem, peer_did=peer.did)
        commit = self.machine_from_journal(peer.public_key)
        before = commit.state
        resumed = commit.decision_received(token)
        if resumed is None:
            return {"t": "discarded"}
        if before in (AWAIT_DECISION, IN_DOUBT, FINISHED_PAUSED, COMMITTED):
            self.services.audit("resumed", self.mid, role="destination", token=resumed)
        if commit.state == RUNNING:
            commit.finish()
        return {"t": "resumed", "jws": resumed}

    def resume_committed(self) -> None:
        """The commit decision is durable here (recovery): run the guest, finish."""
        commit = self.machine_from_journal(None)
        if commit.state in (COMMITTED, RUNNING):
            before = commit.state
            resumed = commit.resume()
            if before == COMMITTED:
                self.services.audit("resumed", self.mid, role="destination", token=resumed)
        if commit.state == RUNNING:
            commit.finish()

    def journal(self, phase: str, **fields: Any) -> None:
        """B's journal: the commit machine's writer (cold and live)."""
        record(self.services, self.mid, "destination", phase, **fields)


def _send_quietly(control: Any, message: dict) -> None:
    try:
        control.send_control(message)
    except MigsecError:
        pass


def _connection_lost(exc: BaseException) -> bool:
    return isinstance(exc, RESUMABLE)

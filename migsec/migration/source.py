"""The source side of one migration (the VMM agent at A), run in a worker thread.

Journal phases (``migsec.migration.journal``), each written before it takes effect::

    requested -> authorized -> handshaken -> suspended -> streaming -> streamed -> saved
      -> receipt-received -> committed (point of no return) -> released -> done
    any failure before ``committed`` -> aborted -> rolled-back (the guest runs at A again)

A is the coordinator: after B's signed receipt A writes its decision durably and
tells B to resume; once B's signed Resumed arrives A releases its copy (the guest
is already stopped at A: saved). The rules and the journal are
``migsec.transfer.commit.SourceCommit``'s (its only writer, cold and live): this class
feeds it events and gives it A's copy (``migsec.migration.release.SourceCopy``); a live move
(``migsec.migration.live.run_source``) feeds the same machine; ``migsec recover`` rebuilds it
from the same journal.

Downtime: after the suspend, libvirt saves the memory in a background thread while
the disks stream, and the save image itself streams while libvirt writes it
(``dataplane.source_streams``): its END, and so B's restore, waits until libvirt wrote
the image's final magic (its last write; it then still stops QEMU for a second or
more). A's decision waits for the save to succeed: a failed save rolls back like any
other failure before the commit (B discards its paused copy). The image was hashed as
it was written, so A re-hashes the final file while B restores and aborts, before its
commit, if the two differ.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from migsec import virt
from migsec.errors import (
    RESUMABLE,
    DomainNotFoundError,
    IntegrityError,
    MigrationFailed,
    MigsecError,
    NetworkError,
    TransferError,
)
from migsec.migration import dataplane, link
from migsec.migration.dataplane import PLANE_TIMEOUT_S
from migsec.migration.jobs import AbortSwitch, record
from migsec.migration.live import run_source
from migsec.migration.release import SourceCopy, domain_state, journal_fields, restart_at_source
from migsec.protocol.errors import parse_peer_reason, peer_error_text
from migsec.transfer.commit import COLD_RECEIPT, LIVE_RECEIPT, SourceCommit, as_control
from migsec.transfer.extents import file_digest
from migsec.transfer.plane import linger
from migsec.transfer.source import WriterOutcome

__all__ = ["OutgoingMigration", "domain_state", "restart_at_source"]  # the last two: release's

if TYPE_CHECKING:
    from migsec.auth.servers import Grant
    from migsec.migration.jobs import ProgressTracker
    from migsec.migration.link import SourceSession
    from migsec.daemon.services import Services
    from migsec.virt.describe import DomainInfo

log = logging.getLogger("migsecd.source")
# a cut connection is retried for 15.5 s in all (a WAN blip of seconds, a peer's restart), within --timeout
MAX_RESUMES = 5
RESUME_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
REPLY_TIMEOUT_S = 120


class OutgoingMigration:
    """Drives one authorized migration from this host to a peer domain."""

    def __init__(self, services: Services, grant: Grant, emit: Callable[[dict], None]) -> None:
        self.services = services
        self.grant = grant
        self.emit = emit
        self.request = grant.request
        self.options = dict(grant.request.options)
        self.mid = grant.migration_id
        self.domain = grant.request.vm
        self.dest_did = grant.destination_did
        self.started = time.monotonic()
        timeout = self.options.get("timeout")
        self.deadline = self.started + timeout if timeout else None
        self.work_dir = Path(services.config.paths.staging_dir) / f"out-{self.mid}"
        self.saved_image = self.work_dir / "memory.save"
        self.bytes_on_wire = 0
        self.data_bytes = 0
        self.logical_bytes = 0
        self.downtime_started: float | None = None
        self.was_paused = False
        self.released: dict = {}
        self.tracker: ProgressTracker | None = None  # set by the `migrate` handler, read by `jobs`
        self.abort = AbortSwitch()  # `migsec jobs abort`: rolls back as --timeout does
        self.conn: Any = None  # this host's libvirt, once the handshake succeeded
        self.saver: _Background | None = None
        self.restarted: str | None = None  # how the guest runs here again after an abort
        self.commit_signal: str | None = None  # live: what let A commit ("qemu-exit" or "libvirt")
        # the commit rules and A's journal, cold or live; B's key comes with the handshake. Live:
        # libvirt's Confirm stops A's copy once its migration returned ("streams sent")
        live = self.request.mode == "live"
        self.commit = SourceCommit(
            migration_id=self.mid, src_did=services.did, dest_did=self.dest_did, key=services.identity.key,
            peer_key=None, journal=self._commit_journal, resume_vm=self._restart_here,
            release_vm=self._release, clock=services.clock,
            receipt_state=LIVE_RECEIPT if live else COLD_RECEIPT, stopped_when_sent=live)

    # ---- the flow ----------------------------------------------------------------------
    def run(self) -> dict:
        services = self.services
        dry_run = bool(self.options.get("dry_run"))
        plan = self.request.require_plan()  # the AZ signed one: B refuses a request without it
        peer = services.peers.get(self.dest_did)
        if not dry_run:
            self.commit.authorized(domain=self.domain, peer=self.dest_did, address=peer.address,
                                   user=self.grant.user, options=self.options, work_dir=str(self.work_dir),
                                   save_image=str(self.saved_image), plan=plan.to_dict())
        self.step(f"connecting to {self.dest_did} at {peer.address}")
        try:
            session = link.connect(services, peer, self.request, self.grant.token, migration_id=self.mid)
        except MigsecError as exc:
            # nothing was touched yet: the guest never stopped running here (no conn: _restart_here)
            if not dry_run:
                self.commit.fail(str(exc))
            if isinstance(exc, NetworkError):
                raise MigrationFailed(f"{exc}; {self.domain} was not touched") from exc
            raise
        self.step(f"{self.dest_did} accepted (certificates verified, its policy permits, capacity ok)")
        if dry_run:
            session.close()
            return self.result(dry_run=True)
        self.commit.handshaken(session.peer.public_key, transcript_hash=session.keys.transcript_hash,
                               mode=self.request.mode)
        conn = self.conn = virt.connect(services.config.libvirt.uri)
        try:
            if self.request.mode == "live":
                return run_source(self, conn, session)
            return self._move(conn, session)
        finally:
            conn.close()

    def _move(self, conn: Any, session: SourceSession) -> dict:
        """Suspend, save while the disks stream, then the commit exchange (transfer.SourceCommit)."""
        commit = self.commit
        try:
            self.check_deadline()  # an abort (or --timeout) during the handshake: never suspend
            self.work_dir.mkdir(parents=True, exist_ok=True)
            info = virt.describe_domain(conn, self.domain)
            self.was_paused = info.state.value == "paused"
            if not self.was_paused:
                virt.suspend_domain(conn, self.domain)
            self.downtime_started = time.monotonic()
            commit.suspended(was_paused=self.was_paused)
            self.step(f"suspended {self.domain}; saving its memory while the disks stream")
            self.saver = _Background(lambda: virt.save_domain(conn, self.domain, str(self.saved_image),
                                                              paused=True))
            session, result = self._transfer(session, info, self.saver)
            # The memory image was hashed as libvirt wrote it; re-hash the final file while
            # B restores, so that a rewrite libvirt did not announce can never be committed.
            recheck = _Background(lambda: self._recheck_saved_image(result.manifest), name="migsec-recheck")
            commit.streams_sent(result.manifest, result.manifest_json)
            self.step("every stream verified by the destination (SHA-256); waiting for its receipt")
            receipt = self._expect(session, "receipt")
            # the image may have been complete (final magic) before libvirt's save returned:
            # never commit before libvirt said the save succeeded
            self.saver.join()
            recheck.join()
            commit.saved(memory_sha256=_memory_digest(result.manifest))
            self.services.audit("receipt", self.mid, role="source", manifest=result.manifest_json.decode(),
                                peer_token=receipt, peer_cert_pem=session.peer.cert_pem, peer_did=self.dest_did)
            # verifies the receipt against the manifest, then journals "committed": no way back
            decision = commit.receipt_received(receipt)
        except BaseException as exc:
            self._abort(session, exc)
            session.close()
            if isinstance(exc, MigsecError) and not isinstance(exc, MigrationFailed):
                raise MigrationFailed(f"migration of {self.domain} failed and was rolled back: {exc}",
                                      rolled_back=True) from exc
            if isinstance(exc, OSError):  # a local call nobody wrapped: never a network fault here
                raise MigrationFailed(f"migration of {self.domain} failed and was rolled back: "
                                      f"{exc.strerror or exc}", rolled_back=True) from exc
            raise
        self.services.audit("decision", self.mid, role="source", token=decision, outcome="commit")
        self.step(f"{self.dest_did} restored {self.domain} paused and signed a receipt; decided: commit")
        try:
            session.control.send_control(as_control("decision", decision))
            resumed = self._expect(session, "resumed")
            commit.resumed_received(resumed)  # releases A's copy, journals released + done
            self.services.audit("resumed", self.mid, role="source", peer_token=resumed,
                                peer_cert_pem=session.peer.cert_pem, peer_did=self.dest_did)
        except MigsecError as exc:
            commit.fail(str(exc))  # after the commit: A stays stopped, the decision stands
            raise MigrationFailed(f"{self.domain} was committed to {self.dest_did} but it did not confirm "
                                  f"resuming it ({exc}); run `migsec recover`") from exc
        finally:
            session.close()
        self.step(f"{self.domain} is running at {self.dest_did}")
        return self.result()

    def _transfer(self, session: SourceSession, info: DomainInfo, saver: "_Background") -> tuple[Any, Any]:
        """Stream everything, resuming on a new connection after a break; returns the SendResult."""
        files = dataplane.request_files(self.request)
        attempt = 0
        while True:
            try:
                self.check_deadline()
                self.commit.streaming(attempt=attempt, transcript_hash=session.keys.transcript_hash)
                result = dataplane.send(session, dataplane.source_streams(info, files, saver, self.saved_image),
                                        bandwidth=self.bandwidth(), progress=self.progress,
                                        timeout=self.remaining())
                self.bytes_on_wire = session.bytes_on_wire
                self.data_bytes, self.logical_bytes = result.data_bytes, result.logical_bytes
                return session, result
            except RESUMABLE as exc:  # only a cut connection resumes (not a local disk's error)
                session.close()
                if saver.failed:
                    saver.join()  # raises the save error: nothing to resume
                attempt += 1
                if attempt > MAX_RESUMES:
                    raise TransferError(f"connection to {self.dest_did} lost {attempt} times, giving up: {exc}") from exc
                delay = RESUME_BACKOFF_S[min(attempt - 1, len(RESUME_BACKOFF_S) - 1)]
                self.step(f"connection lost ({exc}); resuming in {delay:.1f} s (attempt {attempt}/{MAX_RESUMES})")
                time.sleep(delay)
                self.check_deadline()
                peer = self.services.peers.get(self.dest_did)
                while True:
                    try:
                        session = link.connect(self.services, peer, self.request, self.grant.token,
                                               migration_id=self.mid, resume_of=self.mid)
                        break
                    except NetworkError as exc2:
                        attempt += 1
                        if attempt > MAX_RESUMES:
                            raise TransferError(f"cannot reconnect to {self.dest_did}: {exc2}") from exc2
                        time.sleep(RESUME_BACKOFF_S[min(attempt - 1, len(RESUME_BACKOFF_S) - 1)])
                        self.check_deadline()

    def _recheck_saved_image(self, manifest: Any) -> None:
        sent = _memory_digest(manifest)
        try:
            now = file_digest(self.saved_image)
        except OSError as exc:
            raise IntegrityError(f"cannot re-read the save image {self.saved_image}: {exc.strerror}") from exc
        if now != sent:
            raise IntegrityError(f"the save image {self.saved_image} changed after it was streamed "
                                 f"(stream digest {now[:16]}..., sent {str(sent)[:16]}...)")

    def _expect(self, session: SourceSession, kind: str) -> str:
        """The next commit message of ``kind`` from B (its compact JWS); B's abort is an error."""
        message = session.control.recv_control(max(1.0, min(REPLY_TIMEOUT_S, self.remaining())))
        if message.get("t") == "abort":  # B's code, in our words (its log has the detail)
            raise TransferError(f"{self.dest_did} aborted: {peer_error_text(parse_peer_reason(message.get('reason')))}")
        token = message.get("jws")
        if message.get("t") != kind or not isinstance(token, str):
            raise TransferError(f"expected a {kind} from {self.dest_did}, got {message.get('t')!r}")
        return token

    def _abort(self, session: SourceSession, cause: BaseException) -> None:
        """Before the decision: SourceCommit journals the abort, runs the guest here again and
        signs the abort Decision (the same one if it already aborted on a refused receipt)."""
        reason = str(cause) or type(cause).__name__
        log.warning("migration %s of %s failed, rolling back: %s", self.mid, self.domain, reason)
        code = "integrity" if isinstance(cause, IntegrityError) else "aborted"  # all B learns of the cause
        decision = self.commit.fail(reason, code=code)
        if decision is None or self.commit.committed:
            return
        self.services.audit("decision", self.mid, role="source", token=decision, outcome="abort", reason=reason)
        try:
            session.control.send_control(as_control("decision", decision))  # B discards at once
        except MigsecError:
            return  # B learns it when it asks (`migsec recover`); it never runs the guest without a commit
        # B may still be sending ACKs: a close now, with them unread, would reset the connection
        # and could destroy the decision before B read it (B closes once it applied it)
        linger(session.sock)

    # ---- A's copy, as the commit machine's actions ------------------------------------------
    def copy(self) -> SourceCopy:
        return SourceCopy(self.services, self.mid, self.domain, self.dest_did, self.options, self.request.require_plan(),
                          self.work_dir, self.saved_image, self.was_paused)

    def _restart_here(self) -> str:
        if self.conn is None:
            return "never stopped"  # the handshake failed: nothing here was touched
        if self.saver is not None:
            self.saver.wait()  # a save in progress must end before the guest can run again
        how = self.restarted = self.copy().restart(self.conn)
        self.step(f"rolled back: {self.domain} {how} at {self.services.did}")
        return how

    def _release(self) -> dict:
        # destroy; undefine + remove disks (--undefinesource) or mark the kept definition
        self.released = self.copy().release(self.conn)
        for disk in self.released["disks_not_removed"]:
            self.step(f"warning: the moved disk {disk['path']} could not be removed here: {disk['error']}")
        return journal_fields(self.released)

    # ---- helpers ------------------------------------------------------------------------
    def bandwidth(self) -> int | None:
        limits = [b for b in (self.options.get("bandwidth"), self.grant.max_bandwidth,
                              self.services.config.limits.bandwidth_mib_s * 1024 * 1024) if b]
        return min(limits) if limits else None

    def remaining(self) -> float:
        """Seconds left before --timeout (the plane's own limit when there is none)."""
        return PLANE_TIMEOUT_S if self.deadline is None else self.deadline - time.monotonic()

    def check_deadline(self) -> None:
        self.abort.check()
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TransferError(f"--timeout of {self.options.get('timeout')} s exceeded")

    def progress(self, phase: str, done: int, total: int) -> None:
        # called by the plane between records: raising here stops the transfer (then rollback)
        self.check_deadline()
        self.emit({"event": "progress", "phase": phase, "done": done, "total": total})

    def step(self, message: str) -> None:
        log.info("%s: %s", self.mid, message)
        self.emit({"event": "step", "message": message})

    def journal(self, phase: str, **fields: Any) -> None:
        """A's journal (the commit machine's writer)."""
        self.abort.note(phase)  # from "committed" on, `migsec jobs abort` is refused
        record(self.services, self.mid, "source", phase, **fields)

    def _commit_journal(self, phase: str, **fields: Any) -> None:
        """The commit machine's journal: on a cold move an abort requested before its
        "committed" wins over it. A live move's commit follows libvirt's, which stopped A's copy
        already: an abort then is only noted (it has nothing left to roll back)."""
        if self.request.mode != "live":
            self.abort.guard(phase)
        self.journal(phase, **fields)

    def result(self, *, dry_run: bool = False) -> dict:
        now = time.monotonic()
        return {
            "migration_id": self.mid,
            "domain": self.domain,
            "source_did": self.services.did,
            "destination_did": self.dest_did,
            "dry_run": dry_run,
            "seconds": round(now - self.started, 3),
            "downtime_seconds": round(now - self.downtime_started, 3) if self.downtime_started else 0,
            "bytes_on_wire": self.bytes_on_wire,
            "data_bytes": self.data_bytes,
            "logical_bytes": self.logical_bytes,
            # --undefinesource: source disks that are still here (each {"path", "error"})
            "disks_not_removed": list(self.released.get("disks_not_removed", [])),
        }


def _memory_digest(manifest: Any) -> str | None:
    return next((e.digest for e in manifest.streams if e.name == "memory"), None)


class _Background(WriterOutcome):
    """Run a callable in a thread; ``join()`` re-raises its error."""

    def __init__(self, fn: Callable[[], Any], name: str = "migsec-save") -> None:
        super().__init__()
        self._thread = threading.Thread(target=self.record, args=(fn,), daemon=True, name=name)
        self._thread.start()

    @property
    def failed(self) -> bool:
        return self._done.is_set() and self._error is not None

    def wait(self) -> None:
        """Wait for the end, ignoring its outcome."""
        self._done.wait()

    def join(self, timeout: float | None = 600) -> None:
        if not self._done.wait(timeout):
            raise TransferError("saving the guest's memory did not finish in time")
        if self._error is not None:
            raise self._error

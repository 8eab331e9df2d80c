"""The source side of one migration (the VMM agent at A), run in a worker thread.

Phases, each journaled before it takes effect (DESIGN §3.4)::

    authorized -> connected -> suspended -> saved -> transferred -> receipt
               -> committed (point of no return) -> released -> done
    any failure before ``committed``      -> rolled-back (the guest runs at A again)

The coordinator is A: after B's signed receipt A writes its decision durably,
then releases its copy, then tells B to resume. ``migsec recover`` finishes
whatever a crash interrupted from the same journal.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from migsec.errors import (
    AuthorizationDenied,
    MigrationFailed,
    MigsecError,
    ProtocolError,
    ResumeError,
    TransferError,
)

log = logging.getLogger("migsecd.source")
MAX_RESUMES = 3
RESUME_BACKOFF_S = (0.5, 1.0, 2.0)


class OutgoingMigration:
    """Drives one authorized migration from this host to a peer domain."""

    def __init__(self, services: Any, grant: Any, emit: Callable[[dict], None]) -> None:
        self.services = services
        self.grant = grant
        self.emit = emit
        self.request = grant.request
        self.mid = grant.migration_id
        self.domain = self.request["domain"]
        self.dest_did = grant.destination_did
        self.started = time.monotonic()
        timeout = self.request.get("timeout")
        self.deadline = self.started + timeout if timeout else None
        self.work_dir = Path(services.config.paths.staging_dir) / f"out-{self.mid}"
        self.suspended = False
        self.saved_image: Path | None = None
        self.bytes_on_wire = 0

    # ---- the flow ----------------------------------------------------------------------
    def run(self) -> dict:
        from migsec import virt
        from migsec.daemon import link

        services = self.services
        peer = services.peers.get(self.dest_did)
        conn = virt.connect(services.config.libvirt.uri)
        info = virt.describe_domain(conn, self.domain)
        self.journal("authorized", domain=self.domain, peer=self.dest_did, address=peer.address,
                     user=self.grant.user, options=_options(self.request))
        self.step(f"connecting to {self.dest_did} at {peer.address}")
        try:
            session = link.connect(services, peer, self.grant, info, dry_run=bool(self.request.get("dry_run")))
        except MigsecError as exc:
            self.journal("rolled-back", reason=str(exc))
            raise
        self.step(f"{self.dest_did} accepted (certificate verified, its policy permits, capacity ok)")
        if self.request.get("dry_run"):
            session.close()
            self.journal("done", dry_run=True)
            return self.result(dry_run=True)
        try:
            return self._move(conn, info, session)
        finally:
            session.close()

    def _move(self, conn, info, session) -> dict:
        from migsec import virt
        from migsec.daemon import dataplane

        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.journal("suspending", work_dir=str(self.work_dir))
            virt.suspend_domain(conn, self.domain)
            self.suspended = True
            self.step(f"suspended {self.domain}; saving memory while disks stream")
            self.saved_image = self.work_dir / "memory.save"
            plan = dataplane.SourcePlan.build(conn, info, self.saved_image, self.work_dir)
            self.journal("saving", save_image=str(self.saved_image))
            saver = _Background(lambda: virt.save_domain(conn, self.domain, str(self.saved_image), paused=True))
            receipt, session = self._transfer(session, plan, saver)
            self.journal("receipt", receipt=receipt.get("digest"))
        except MigsecError as exc:
            self.rollback(conn, exc)
            raise MigrationFailed(f"migration of {self.domain} failed and was rolled back: {exc}",
                                  rolled_back=True) from exc
        except BaseException as exc:
            self.rollback(conn, exc)
            raise
        # point of no return: the decision is durable before anything is released
        decision = session.sign_decision("commit", receipt)
        self.journal("committed", decision=decision.get("digest"))
        self.services.audit("decision", migration_id=self.mid, role="source", token=decision["token"])
        self.release(conn)
        try:
            resumed = session.send_decision(decision)
            self.services.audit("resumed", migration_id=self.mid, role="source", token=resumed["token"])
            self.journal("done")
        except MigsecError as exc:
            # B has the guest paused and a receipt on record; `migsec recover` re-sends the decision
            self.journal("committed-unacknowledged", reason=str(exc))
            raise MigrationFailed(f"{self.domain} was committed to {self.dest_did} but the decision "
                                  f"was not acknowledged ({exc}); run `migsec recover`") from exc
        self.step(f"{self.domain} is running at {self.dest_did}")
        return self.result()

    def _transfer(self, session, plan, saver):
        """Stream everything, resuming after connection loss; returns (receipt, session)."""
        from migsec.daemon import link

        attempt = 0
        while True:
            try:
                self.check_deadline()
                receipt = session.send_plan(plan, saver=saver, progress=self.progress,
                                            bandwidth=self.bandwidth(), deadline=self.deadline)
                self.bytes_on_wire = session.bytes_on_wire
                return receipt, session
            except (ConnectionError, socket.timeout, OSError, ResumeError, ProtocolError) as exc:
                if isinstance(exc, AuthorizationDenied) or attempt >= MAX_RESUMES:
                    raise TransferError(f"connection to {self.dest_did} lost: {exc}") from exc
                if isinstance(exc, ProtocolError) and not _is_connection_loss(exc):
                    raise
                session.close()
                delay = RESUME_BACKOFF_S[min(attempt, len(RESUME_BACKOFF_S) - 1)]
                attempt += 1
                self.step(f"connection lost ({exc}); resuming in {delay:.1f} s (attempt {attempt}/{MAX_RESUMES})")
                self.journal("resuming", attempt=attempt)
                time.sleep(delay)
                peer = self.services.peers.get(self.dest_did)
                try:
                    session = link.connect(self.services, peer, self.grant, None, resume=session)
                except (ConnectionError, OSError) as exc2:
                    if attempt >= MAX_RESUMES:
                        raise TransferError(f"cannot reconnect to {self.dest_did}: {exc2}") from exc2
                    continue

    def rollback(self, conn, cause: BaseException) -> None:
        """Before the decision: the guest runs at A again; B discards (it never got a commit)."""
        from migsec import virt

        log.warning("migration %s of %s failed, rolling back: %s", self.mid, self.domain, cause)
        try:
            restart_at_source(conn, self.domain, self.saved_image, self.suspended)
        finally:
            self.journal("rolled-back", reason=str(cause) or type(cause).__name__)
            self.services.audit("decision", migration_id=self.mid, role="source",
                                token=None, outcome="abort", reason=str(cause))
            _remove_tree(self.work_dir)

    def release(self, conn) -> None:
        from migsec import virt

        try:
            if _state(conn, self.domain) not in ("shutoff", "absent"):
                virt.destroy_domain(conn, self.domain)
            if self.request.get("undefine_source"):
                virt.undefine_domain(conn, self.domain)
        except MigsecError as exc:
            log.error("releasing %s after commit: %s", self.domain, exc)
        _remove_tree(self.work_dir)
        self.journal("released")

    # ---- helpers ------------------------------------------------------------------------
    def bandwidth(self) -> int | None:
        limits = [b for b in (self.request.get("bandwidth"), self.grant.max_bandwidth,
                              self.services.config.limits.bandwidth_mib_s * 1024 * 1024) if b]
        return min(limits) if limits else None

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TransferError(f"--timeout of {self.request.get('timeout')} s exceeded")

    def progress(self, phase: str, done: int, total: int) -> None:
        self.emit({"event": "progress", "phase": phase, "done": done, "total": total})

    def step(self, message: str) -> None:
        log.info("%s: %s", self.mid, message)
        self.emit({"event": "step", "message": message})

    def journal(self, phase: str, **fields: Any) -> None:
        from migsec.daemon.jobs import record

        record(self.services, self.mid, "source", phase, **fields)

    def result(self, *, dry_run: bool = False) -> dict:
        return {
            "migration_id": self.mid,
            "domain": self.domain,
            "source_did": self.services.did,
            "destination_did": self.dest_did,
            "dry_run": dry_run,
            "seconds": round(time.monotonic() - self.started, 3),
            "bytes_on_wire": self.bytes_on_wire,
        }


def restart_at_source(conn, domain: str, saved_image: Path | None, suspended: bool) -> str:
    """Make the guest run at A again, whatever point the source side reached."""
    from migsec import virt

    state = _state(conn, domain)
    if state == "running":
        return "already running"
    if state == "paused":
        virt.resume_domain(conn, domain)
        return "resumed"
    if saved_image is not None and Path(saved_image).exists():
        virt.restore_domain(conn, str(saved_image), paused=False)
        return "restored from the save image"
    raise MigrationFailed(f"{domain} is {state} at the source and no save image is left to restore")


class _Background:
    """Run a callable in a thread; ``join()`` re-raises its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name="migsec-save")
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # handed to join()
            self._error = exc
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        if not self._done.wait(timeout):
            raise TransferError("saving the guest's memory did not finish in time")
        if self._error is not None:
            raise self._error


def _options(request: dict) -> dict:
    return {k: request.get(k) for k in ("persistent", "undefine_source", "bandwidth", "dry_run", "timeout")}


def _is_connection_loss(exc: ProtocolError) -> bool:
    from migsec.errors import TruncatedStreamError

    return isinstance(exc, TruncatedStreamError) or isinstance(exc.__cause__, OSError)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _state(conn, domain: str) -> str:
    """The domain's state by virsh's name, or "absent" when libvirt does not know it."""
    from migsec import virt
    from migsec.errors import DomainNotFoundError

    try:
        return virt.domain_state(conn, domain).value
    except DomainNotFoundError:
        return "absent"

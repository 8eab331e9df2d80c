"""Live migration (``migsec migrate --live``): libvirt moves the running guest, migsec carries it.

The local exchange, both authorizations, the two-message handshake and the session
keys are those of a cold move. Then, instead of file streams, the session carries
three kinds of byte channels (``migsec.migration.bridge``): libvirt's RPC from A's
libvirtd to B's (through B's filtering proxy, ``migsec.protocol.libvirt_rpc``),
QEMU's migration stream and the NBD disk mirror. A drives the move with
peer-to-peer ``virDomainMigrateToURI3`` (live, non-shared disks) whose destination
URI and migration/disk URIs are unix sockets in ``/run/migsec/<id>/`` (0700) on A;
B's QEMU listens on the same paths on B. On the wire::

    B -> A  {"t": "ready"}               B pre-created the disks (sparse), made its run dir
    ...     channels (libvirt, qemu, nbd) while libvirt migrates
    B -> A  {"t": "receipt", "jws", "job"}  libvirt's Finish left the guest paused at B and its reply
                                          went on to A: Receipt(state "finished-paused", SHA-256 per
                                          direction of the memory and disk channels, and of the
                                          libvirt channel up to its Finish3 call/reply, as B saw
                                          them); "job" = domjobinfo --completed
    A -> B  {"t": "decision", "jws"}     A checked the digests against its own; commit
    B -> A  {"t": "resumed", "jws", "paused_wait_us"}   B resumed the guest (after waiting paused so long)
    or, on any failure: A -> B decision abort / B -> A {"t": "abort", "reason"}

Exactly one side runs the guest, as in a cold move, and the same commit machines decide and
journal it (``migsec.transfer.commit``): A's is ``OutgoingMigration.commit`` (authorized and
handshaken before ``run_source`` runs), B's the one ``IncomingMigration.serve`` journaled
``accepted`` with. libvirt migrates with ``VIR_MIGRATE_PAUSED``, so B's Finish leaves the guest
paused and B resumes it only once it holds and journaled A's signed commit Decision. A decides
commit only once its own copy is gone for good and B's receipt matches: as soon as the source
QEMU exited after B's successful Finish3 reply crossed the session (``migsec.virt.qemupid``: a
pidfd, so the commit does not wait out libvirt's Confirm, which polls for that exit every
200 ms), or else when ``migrateToURI3`` returned (libvirt's Confirm stopped A's copy); from then
on A never resumes. Were B's Finish reply lost, libvirt's Confirm(cancelled) resumes A (its QEMU
never exits) and A's abort makes B destroy its paused copy. Before the Finish, libvirt rolls
back and migsec removes its sockets and B's pre-created disks. After a crash, recovery asks
libvirt at A (``left_this_host``): a guest gone from A went to B (the machine's
``moved_by_libvirt``: commit), one still active at A stays (abort); B's paused copy is in doubt
until A answers. The libvirt channel stays open after the commit (libvirt's Confirm, then its
close); both hosts wait for its ENDs, which check every byte of it, before the session ends.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlsplit

from migsec import virt
from migsec.errors import IntegrityError, MigrationFailed, MigsecError, TransferError
from migsec.hooks import permit
from migsec.migration.bridge import ChannelBridge, LocalEvent
from migsec.migration.dataplane import disk_map
from migsec.migration.jobs import MigrationAborted
from migsec.migration.release import domain_state
from migsec.protocol import RecordLayer, libvirt_rpc as rpc
from migsec.protocol.errors import parse_peer_reason, peer_error_text, peer_reason
from migsec.protocol.libvirt_rpc import RpcFilter, RpcPolicy
from migsec.transfer.commit import AWAIT_DECISION, AWAIT_STREAMS, FINISHED_PAUSED, LIVE_RECEIPT, RECEIVING
from migsec.virt import migrate as vmig, qemupid
from migsec.virt.describe import DomainState
from migsec.virt.incoming import FIRMWARE_DIRS, incoming_domain_xml
from migsec.virt.migrate import create_sparse_image, system_qemu_owner

if TYPE_CHECKING:
    from migsec.migration.destination import IncomingMigration
    from migsec.migration.journal import JournalEntry
    from migsec.migration.link import Accepted, SourceSession
    from migsec.daemon.services import Services
    from migsec.migration.source import OutgoingMigration
    from migsec.protocol.plan import DiskPlan
    from migsec.transfer.commit import DestinationCommit, SourceCommit

log = logging.getLogger("migsecd.live")
RUN_ROOT = Path("/run/migsec")
READY_TIMEOUT_S = 120
FINISH_TIMEOUT_S = 60
REPLY_TIMEOUT_S = 120
TARGET_WAIT_S = 30
PERMIT_TTL_S = 600
LIVE_STATE = LIVE_RECEIPT  # the receipt's state: libvirt's Finish left the guest paused at B


# ---- shared -----------------------------------------------------------------------------------
def run_dir(migration_id: str) -> Path:
    return RUN_ROOT / migration_id


def make_run_dir(migration_id: str, *, group: int | None = None, group_mode: int = 0) -> Path:
    """``/run/migsec/<id>/``, mode 0700, new (a leftover of the same id is refused). ``group``
    (QEMU's, when qemu.conf runs it as non-root) gets ``group_mode`` on it: search (0o010) at A,
    where QEMU connects to the NBD socket, search + write (0o030) at B, where it creates its own."""
    RUN_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = run_dir(migration_id)
    path.mkdir(mode=0o700)
    if group is not None:
        os.chown(path, -1, group)
    os.chmod(path, 0o700 | (group_mode if group is not None else 0))
    return path


def _qemu_gid() -> int | None:
    """QEMU's group when libvirt runs it as non-root (qemu.conf), else None (the lab: root)."""
    owner = system_qemu_owner()
    return None if owner is None else owner.gid


def remove_run_dir(migration_id: str) -> None:
    shutil.rmtree(run_dir(migration_id), ignore_errors=True)


def sweep_run_dirs(journaled: Callable[[str], bool]) -> list[str]:
    """migsecd's start, before it listens (nothing migrates yet): a run directory of a journaled
    migration is a leftover of a daemon that died with it (a kill between its journal's last word
    and its ``finally``, or a committed move recovery finished without looking at libvirt). Its
    sockets have no listener any more; they go. ``journaled(name)``: is that a migration of this
    host's journal. Returns the ids removed."""
    try:
        names = [p.name for p in RUN_ROOT.iterdir() if p.is_dir() and not p.is_symlink()]
    except FileNotFoundError:
        return []
    stale = sorted(n for n in names if journaled(n))
    for mid in stale:
        remove_run_dir(mid)
    return stale


def _uris(migration_id: str) -> dict[str, str]:
    d = run_dir(migration_id)
    return {"libvirt": str(d / "libvirt.sock"), "qemu": str(d / "qemu.sock"), "nbd": str(d / "nbd.sock")}


# ---- A: the source ------------------------------------------------------------------------------
def run_source(job: OutgoingMigration, conn: Any, session: SourceSession) -> dict:
    """A's side after the handshake (``job`` is the OutgoingMigration). The commit exchange is
    ``job.commit`` (``migsec.transfer.commit.SourceCommit``, live: it journaled authorized and
    handshaken with B's key and this session's transcript hash): libvirt's migration is its
    "streams sent", its actions are A's copy (``SourceCopy``), as for a cold move."""
    services, mid, domain = job.services, job.mid, job.domain
    info = virt.describe_domain(conn, domain)
    job.was_paused = info.state.value == "paused"
    bridge = ChannelBridge(session.sock, session.records, role="source", peer_name=job.dest_did)
    try:
        stats, resumed = _source_flow(job, conn, session, bridge, job.commit)
    finally:
        bridge.close()
        remove_run_dir(mid)
    job.bytes_on_wire = bridge.wire_sent + bridge.wire_received
    job.step(f"{domain} is running at {job.dest_did}; every channel's SHA-256 matches B's receipt")
    result = job.result()
    result.update(mode="live", job=stats, channels=bridge.channel_bytes(), downtime_seconds=None,
                  commit_signal=job.commit_signal)
    result.update(downtime(stats, resumed))  # None: the pause could not be measured whole
    return result


def downtime(stats: dict, resumed: dict) -> dict:
    """The guest's real pause: libvirt's downtime (B's completed job, up to its Finish) plus the
    time B kept it paused after the Finish until A's commit let it resume (B's clock)."""
    libvirt_ms, wait_us = stats.get("downtime_ms"), resumed.get("paused_wait_us")
    out: dict[str, Any] = {}
    if isinstance(libvirt_ms, int) and not isinstance(libvirt_ms, bool):
        out["libvirt_downtime_ms"] = libvirt_ms
    if isinstance(wait_us, int) and not isinstance(wait_us, bool) and wait_us >= 0:
        out["paused_wait_ms"] = round(wait_us / 1000, 1)
    if "libvirt_downtime_ms" in out and "paused_wait_ms" in out:
        out["downtime_seconds"] = round((out["libvirt_downtime_ms"] + out["paused_wait_ms"]) / 1000, 3)
    return out


def _source_flow(job: OutgoingMigration, conn: Any, session: SourceSession, bridge: Any,
                 commit: SourceCommit) -> tuple[dict, dict]:
    services, mid, domain = job.services, job.mid, job.domain
    paths = _uris(mid)
    try:
        qemu_gid = _qemu_gid()
        make_run_dir(mid, group=qemu_gid, group_mode=0o010)
        commit.streaming(attempt=0, mode="live", run_dir=str(run_dir(mid)), was_paused=job.was_paused)
        for kind, path in paths.items():
            bridge.listen(kind, path, group=qemu_gid if kind == "nbd" else None)  # QEMU connects to nbd.sock
        _expect(bridge, job, "ready", READY_TIMEOUT_S)  # B pre-created the disks, wrote the hook's permit
        job.step(f"{job.dest_did} is ready (disks pre-created sparse); libvirt migrates {domain} live "
                 "through the session")
        flags = vmig.live_flags(persistent=bool(job.options.get("persistent")),
                                undefine_source=bool(job.options.get("undefine_source")))
        targets = [d.target for d in job.request.require_plan().mirrored_disks]
        job.abort.check()  # an abort while B prepared: libvirt has not started
        watch = qemupid.watch_exit(services.config.libvirt.uri, domain, job.request.require_plan().vm_uuid,
                                   lambda: bridge.post_local(LocalEvent(t="qemu-exited")))
        try:
            mover = _Call(lambda: _migrate(services, domain, paths, flags, job.bandwidth(), targets),
                          on_done=lambda: bridge.post_local(LocalEvent(t="migrated")))
            held, early = _watch(job, conn, mover, bridge, watch)
        finally:
            if watch is not None:
                watch.close()
        if not early:
            _join(job, conn, mover)  # raises libvirt's error: libvirt rolled back, the guest is here
    except BaseException as exc:
        if _left_here(conn, domain):
            # whatever failed here, libvirt moved the guest (its Confirm stopped this copy): B holds
            # the only copy, paused; an abort would destroy it. Undecided: recovery commits.
            log.error("migration %s: %s failed, but %s left this host: not aborting", mid, exc, domain)
            raise MigrationFailed(f"{domain} left this host (libvirt moved it to {job.dest_did}, where it "
                                  f"waits paused), but the migration failed here: {exc}; the move is "
                                  "undecided until `migsec recover` (or migsecd's automatic recovery) "
                                  "settles it from libvirt's outcome") from exc
        _rollback(job, commit, exc, bridge)
        raise
    # B's Finish left the guest paused there, and here either its QEMU exited (libvirt's Confirm
    # stopped it: nobody can resume it) or migrateToURI3 returned: from now on A never resumes it
    # (the machine's stopped_when_sent); B runs it once A's commit arrives
    if not job.abort.past_return(f"libvirt moved {domain} to {job.dest_did} (its copy here is stopped): the "
                                 "move completes there and can no longer be aborted"):
        log.warning("migration %s: an abort came after libvirt moved %s: too late, the move completes", mid,
                    domain)
    job.commit_signal = "qemu-exit" if early else "libvirt"
    bridge.mark(f"commit on {job.commit_signal}")
    job.step(f"{job.dest_did} finished the move ({domain} waits paused there) and "
             + ("the source QEMU here exited: committing" if early else "libvirt's migration returned: committing"))
    bridge.stop_listening()
    try:
        waited: MigsecError | None = None
        try:  # the memory and disk channels ended (B's ENDs came before its receipt)
            bridge.wait_channels_done(FINISH_TIMEOUT_S, kinds=("qemu", "nbd"))
            digests = bridge.commit_digests()
        except MigsecError as exc:
            waited, digests = exc, bridge.digests()
        commit.digests_sent(digests)
        if waited is not None:
            raise waited
        message = held if held is not None else _next_message(bridge, REPLY_TIMEOUT_S)
        if message.get("t") == "abort":
            raise TransferError(f"{job.dest_did} aborted: {peer_error_text(parse_peer_reason(message.get('reason')))}")
        token = message.get("jws")
        if message.get("t") != "receipt" or not isinstance(token, str):
            raise TransferError(f"expected a receipt from {job.dest_did}, got {message.get('t')!r}")
    except MigsecError as exc:
        if commit.state != AWAIT_STREAMS:  # (else "streamed" was not journaled: recovery decides all)
            commit.fail(str(exc))  # in doubt: no receipt was refused, and A's copy is gone
        raise MigrationFailed(f"{domain} left this host (libvirt stopped it here) and waits paused at "
                              f"{job.dest_did}, but the exchange after it failed: {exc}; the move is undecided "
                              "until `migsec recover` (or migsecd's automatic recovery) settles it from "
                              "libvirt's outcome") from exc
    b_stats = message.get("job")
    stats: dict[str, Any] = b_stats if isinstance(b_stats, dict) else {}
    audit_receipt = partial(services.audit, "receipt", mid, role="source", mode="live", peer_token=token,
                            peer_cert_pem=session.peer.cert_pem, peer_did=job.dest_did)
    try:
        decision = commit.receipt_received(token)  # journals receipt-received and committed
    except MigsecError as exc:
        # refused: abort, although A's copy is gone; B destroys its paused copy
        audit_receipt()
        abort = commit.abort_token
        if abort is not None:
            services.audit("decision", mid, role="source", token=abort, outcome="abort", reason=str(exc)[:1000])
            _send_quietly(bridge, {"t": "decision", "jws": abort})
        raise MigrationFailed(f"{job.dest_did}'s receipt for {domain} was refused ({exc}): aborted, "
                              f"{job.dest_did} discards its paused copy; here {domain} is "
                              f"{job.restarted or 'not restarted'}") from exc
    try:
        bridge.send_control({"t": "decision", "jws": decision})
        # ledgered while B resumes (the journal holds both tokens durably already)
        audit_receipt()
        services.audit("decision", mid, role="source", token=decision, outcome="commit", mode="live")
        answer = _next_message(bridge, REPLY_TIMEOUT_S)
        if answer.get("t") != "resumed" or not isinstance(answer.get("jws"), str):
            raise TransferError(f"expected resumed from {job.dest_did}, got {answer.get('t')!r}")
        services.audit("resumed", mid, role="source", peer_token=answer["jws"],
                       peer_cert_pem=session.peer.cert_pem, peer_did=job.dest_did)
        commit.resumed_received(answer["jws"])  # releases A's copy, journals released and done
    except MigsecError as exc:
        commit.fail(str(exc))  # committed: A stays stopped; recovery sends the commit again
        raise MigrationFailed(f"{domain} is committed to {job.dest_did}, which has not confirmed that it "
                              f"resumed it: {exc}; `migsec recover` sends the decision again") from exc
    if early:
        _after_commit(job, mover, bridge)
    return stats, answer


def _next_message(bridge: Any, timeout: float) -> dict:
    """The peer's next commit message (this host's own events, which no longer matter, skipped)."""
    while True:
        message = bridge.recv_control(timeout)
        if not isinstance(message, LocalEvent):
            return message


def _after_commit(job: OutgoingMigration, mover: "_Call", bridge: Any) -> None:
    """Committed on QEMU's exit: libvirt's Confirm still ends its job (and closes its connection
    to B through this session). Its error cannot change the outcome (A's copy is gone); the
    libvirt channel's ENDs still check every byte of it."""
    if not mover.done.wait(FINISH_TIMEOUT_S):
        log.warning("migration %s: libvirt's migrateToURI3 had not returned %d s after the commit", job.mid,
                    FINISH_TIMEOUT_S)
        return
    if mover.error is not None:
        log.warning("migration %s: committed (the source QEMU exited after B's Finish), but libvirt "
                    "reported: %s", job.mid, mover.error)
    try:
        bridge.wait_channels_done(FINISH_TIMEOUT_S)
    except MigsecError as exc:
        log.warning("migration %s: committed, but libvirt's connection to %s did not end cleanly: %s",
                    job.mid, job.dest_did, exc)


def _send_quietly(bridge: Any, message: dict) -> None:
    try:
        bridge.send_control(message)
    except MigsecError:
        pass  # B cleans up when the session ends, or asks (`migsec recover`)


def _left_here(conn: Any, domain: str) -> bool:
    """Is the guest gone from this host (shut off or undefined by libvirt's Confirm)?"""
    try:
        return domain_state(conn, domain) in ("absent", "shutoff")
    except MigsecError:
        return False  # libvirt cannot tell: the guest is not known to be gone


def _join(job: OutgoingMigration, conn: Any, mover: "_Call") -> None:
    """libvirt's outcome: ``migrateToURI3``'s error, unless the guest left this host after all
    (an error after the Confirm that stopped it here: then B holds it paused)."""
    try:
        mover.join()
    except MigsecError as exc:
        state = domain_state(conn, job.domain)
        if state not in ("absent", "shutoff"):
            raise
        log.warning("migration %s: libvirt reported %s, but %s is %s here: it left this host", job.mid, exc,
                    job.domain, state)


def _migrate(services: Services, domain: str, paths: dict, flags: int, bandwidth: int | None,
             targets: list[str]) -> None:
    with virt.connect(services.config.libvirt.uri) as conn:
        vmig.migrate_live(conn, domain, dconnuri=f"qemu+unix:///system?socket={paths['libvirt']}",
                          migrate_uri=f"unix://{paths['qemu']}", disks_uri=f"unix://{paths['nbd']}",
                          flags=flags, bandwidth=bandwidth, disks=targets or None)


def _watch(job: OutgoingMigration, conn: Any, mover: "_Call", bridge: Any, watch: Any) -> tuple[dict | None, bool]:
    """While libvirt migrates: progress from its job; --timeout, an operator's abort (`migsec jobs
    abort`, Ctrl-C of `migsec migrate`) and a failed session abort the job (libvirt rolls back).

    Returns when ``migrateToURI3`` returned, or earlier when the move can commit: B's receipt is
    here, libvirt's successful Finish3 reply crossed this session, and this host's source QEMU
    exited (its copy is gone for good). Returns B's message that arrived meanwhile (a receipt or
    an abort, or None) and whether the move may commit before libvirt's job ended."""
    held: dict | None = None
    while True:
        asked = time.monotonic()
        try:
            event = bridge.recv_control(0.5)
        except MigsecError:
            event = None  # a timeout, or the session ended (bridge.error, below)
            time.sleep(max(0.0, 0.5 - (time.monotonic() - asked)))  # an ended session answers at once
        if isinstance(event, LocalEvent):
            pass  # migrated, qemu-exited, finish3: the conditions are checked below
        elif event is not None and held is None:
            held = event
        elif event is not None:  # libvirt's job is not ours to leave half-done: its outcome decides
            log.warning("migration %s: ignoring a second message (%r) from %s while libvirt migrates", job.mid,
                        event.get("t"), job.dest_did)
        if mover.done.is_set():
            return held, False
        if (held is not None and held.get("t") == "receipt" and watch is not None and watch.exited.is_set()
                and bridge.finish3_ok()):
            log.info("migration %s: the source QEMU exited after B's Finish: committing before libvirt's "
                     "Confirm returns", job.mid)
            return held, True
        aborted = job.abort.reason is not None
        if bridge.error is not None or aborted or (job.deadline is not None and time.monotonic() > job.deadline):
            _abort_libvirt(job, conn, mover, bridge, aborted)
            return held, False
        if event is None:
            _progress(job, conn)


def _abort_libvirt(job: OutgoingMigration, conn: Any, mover: "_Call", bridge: Any, aborted: bool) -> None:
    why = ("the session failed" if bridge.error is not None
           else f"aborted: {job.abort.reason}" if aborted else "--timeout passed")
    log.warning("migration %s: %s; aborting libvirt's job", job.mid, why)
    try:
        vmig.abort_job(conn, job.domain)
    except MigsecError:
        pass
    mover.done.wait(60)
    ours: BaseException | None = None
    if aborted and bridge.error is None:
        ours = MigrationAborted(str(job.abort.reason))
    elif job.deadline is not None and time.monotonic() > job.deadline and bridge.error is None:
        ours = TransferError(f"live migration of {job.domain} did not finish within --timeout")
    if ours is not None:
        # libvirt's own error is "job canceled by client": say why we canceled it
        ours.__cause__ = mover.error
        mover.error = ours


def _progress(job: OutgoingMigration, conn: Any) -> None:
    try:
        stats = vmig.job_stats(conn, job.domain)
    except MigsecError:  # e.g. the domain just left with --undefinesource: progress is optional
        stats = None
    if stats is not None and stats.data_total:
        job.emit({"event": "progress", "phase": "live", "done": int(stats.data_processed or 0),
                  "total": int(stats.data_total)})


def _expect(bridge: Any, job: OutgoingMigration, kind: str, timeout: float) -> Any:
    message = bridge.recv_control(timeout)
    if message.get("t") == "abort":
        raise TransferError(f"{job.dest_did} aborted: {peer_error_text(parse_peer_reason(message.get('reason')))}")
    if message.get("t") != kind:
        raise TransferError(f"expected {kind} from {job.dest_did}, got {message.get('t')!r}")
    return message.get("jws", message)


def _rollback(job: OutgoingMigration, commit: SourceCommit, cause: BaseException, bridge: Any) -> None:
    """libvirt did not move the guest (it runs here again): the machine's abort (its resume_vm,
    ``OutgoingMigration._restart_here``, says how), then tell B, which destroys its copy
    (paused: B never runs it without A's commit)."""
    reason = str(cause) or type(cause).__name__
    log.warning("live migration %s of %s failed, rolling back: %s", job.mid, job.domain, reason)
    code = "integrity" if isinstance(cause, IntegrityError) else "aborted"  # all B learns of the cause
    try:
        decision = commit.fail(reason[:1000], code=code)
    except MigsecError as exc:
        log.error("migration %s: %s is not running here after the rollback: %s", job.mid, job.domain, exc)
        raise
    if decision is not None:
        job.services.audit("decision", job.mid, role="source", token=decision, outcome="abort",
                           reason=reason[:1000])
        _send_quietly(bridge, {"t": "decision", "jws": decision})  # B cleans up at once
    if isinstance(cause, MigsecError) and not isinstance(cause, MigrationFailed):
        raise MigrationFailed(f"live migration of {job.domain} failed and was rolled back: {cause}",
                              rolled_back=True) from cause


class _Call:
    """Run ``fn`` in a thread; ``join()`` re-raises its error; ``on_done()`` after it ended."""

    def __init__(self, fn: Any, on_done: Callable[[], None] | None = None) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None

        def body() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised by join()
                self.error = exc
            finally:
                self.done.set()
                if on_done is not None:
                    on_done()

        threading.Thread(target=body, daemon=True, name="migsec-live-migrate").start()

    def join(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


# ---- B: the destination ------------------------------------------------------------------------
def libvirt_socket(uri: str) -> str:
    """The unix socket of this host's libvirtd for ``uri`` (``?socket=`` or the system default)."""
    parts = urlsplit(uri)
    sock = parse_qs(parts.query).get("socket")
    if sock:
        return sock[0]
    if parts.scheme not in ("qemu", "qemu+unix") or parts.netloc:
        raise MigsecError(f"[libvirt].uri {uri!r}: a live migration needs this host's local libvirtd")
    return "/run/libvirt/libvirt-sock"


class _RpcChannel:
    """B's libvirt RPC proxy on one channel: live-rpc's RpcFilter, its refusals audited.
    ``on_finish(ok, cancelled)`` runs when libvirt's Finish reply passes, before it is forwarded."""

    def __init__(self, services: Services, mid: str, policy: Any, state: dict,
                 on_finish: Callable[[bool, bool], None] | None = None, mark: Any = None) -> None:
        self.services, self.mid, self.state = services, mid, state
        self.filter = RpcFilter(policy)
        self.on_finish = on_finish
        self.mark = mark  # the bridge's timeline (ChannelBridge.mark), or None

    def _events(self, events: list) -> None:
        for event in events:
            procedure = getattr(event, "procedure", "")
            if self.mark is not None and not procedure.startswith("KEEPALIVE"):
                self.mark(f"rpc {type(event).__name__} {procedure}".rstrip())
            if isinstance(event, rpc.Refused):
                log.warning("migration %s: refused libvirt RPC %s (serial %s): %s", self.mid,
                            event.procedure, event.serial, event.reason)
                self.services.audit("rpc-refused", self.mid, role="destination", procedure=event.procedure,
                                    serial=event.serial, reason=str(event.reason)[:500])
                self.state["refused"] = str(event.reason)[:500]
            elif isinstance(event, rpc.PrepareDone):
                self.state["prepare"] = (event.ok, event.message)
            elif isinstance(event, rpc.FinishDone):
                self.state["finish"] = (event.ok, event.cancelled, event.message)
                if self.on_finish is not None:
                    self.on_finish(bool(event.ok), bool(event.cancelled))

    def from_peer(self, data: bytes) -> tuple[bytes, bytes]:
        self._events(self.filter.client_data(data))
        return self.filter.data_to_server(), self.filter.data_to_client()

    def from_target(self, data: bytes) -> tuple[bytes, bytes]:
        self._events(self.filter.server_data(data))
        return self.filter.data_to_server(), self.filter.data_to_client()


def _connect_unix(path: str, wait: float) -> socket.socket:
    deadline = time.monotonic() + wait
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError as exc:
            s.close()
            if time.monotonic() >= deadline:
                raise TransferError(f"cannot connect to {path}: {exc}") from exc
            time.sleep(0.05)


def is_live(entry: JournalEntry) -> bool:
    return entry.plan().mode == "live"


def serve_destination(incoming: IncomingMigration, conn: socket.socket, accepted: Accepted,
                      commit: DestinationCommit) -> None:
    """B's side of a live move (``incoming`` is the IncomingMigration, ``commit`` its machine,
    which journaled ``accepted``; built live: its discard waits for libvirt to drop an unfinished
    guest, A's abort destroys a paused one).

    libvirt's Finish (it leaves the guest paused) is the machine's restore step
    (``finished_paused``), seen in the RPC proxy; the receipt follows once every channel ended.
    """
    services, mid, request = incoming.services, incoming.mid, accepted.request
    records = RecordLayer(accepted.keys, "destination")
    state: dict = {}
    timing = incoming.timing = {}  # the machine's resume_vm marks "resumed" in it
    opened: set[str] = set()
    bridge: Any = None
    lock = threading.RLock()  # the machine is fed from this thread and from the RPC proxy's

    def on_finish(ok: bool, cancelled: bool) -> None:
        if not ok or cancelled:
            return  # libvirt removes the incoming guest itself
        timing["finished"] = time.monotonic()
        with lock:
            try:  # journaled (with a receipt) before the reply goes on to A's libvirt, which may
                # then stop A's copy: from here B is in doubt, and a commit has a receipt to name
                commit.finished_paused(bridge.digests(), finished="libvirt (paused)")
            except MigsecError as exc:
                log.error("migration %s: libvirt's Finish left %s paused here, but: %s", mid, request.vm, exc)

    try:
        plan = request.require_plan()
        uuid, disks = plan.vm_uuid, plan.mirrored_disks
        dmap = disk_map(services, [str(d.source) for d in disks])
        paths = _uris(mid)
        with virt.connect(services.config.libvirt.uri) as vconn:
            predefined = vmig.is_persistent(vconn, uuid)
            preactive = predefined is not None and virt.domain_state(vconn, uuid).active
        make_run_dir(mid, group=_qemu_gid(), group_mode=0o030)  # B's QEMU creates its sockets here
        commit.receiving(attempt="live", mode="live", run_dir=str(run_dir(mid)), created_disks=[],
                         predefined=bool(predefined), preactive=preactive)
        created = _precreate(commit, disks, dmap)
        write_permit(services, mid, uuid, request.vm)
        network = services.config.network
        policy = RpcPolicy(
            domain_name=request.vm, domain_uuid=uuid,
            migrate_uri=f"unix://{paths['qemu']}", disks_uri=f"unix://{paths['nbd']}",
            rewrite_xml=partial(incoming_domain_xml, disk_map=dmap, network_map=dict(network.map) or None,
                                bridge_map=dict(network.bridge_map) or None, expected_name=request.vm,
                                expected_uuid=uuid,
                                boot_dirs=FIRMWARE_DIRS + tuple(services.config.storage.boot_dirs)))
        libvirtd = libvirt_socket(services.config.libvirt.uri)

        def connect_target(kind: str, channel: int) -> tuple[socket.socket, Any]:
            if kind in opened and kind == "libvirt":
                raise TransferError("a second libvirt connection in one migration")
            opened.add(kind)
            if kind == "libvirt":
                return _connect_unix(libvirtd, 5), _RpcChannel(services, mid, policy, state, on_finish,
                                                               bridge.mark)
            return _connect_unix(paths[kind], TARGET_WAIT_S), None

        bridge = ChannelBridge(conn, records, role="destination", peer_name=accepted.src_did,
                               connect_target=connect_target, rate=accepted.bandwidth)
        bridge.send_control({"t": "ready", "disks": len(created)})
        while True:  # as long as libvirt migrates; keepalives watch the link
            message = bridge.recv_control(24 * 3600)
            if isinstance(message, LocalEvent):
                if message.get("t") == "finish3" and message.get("ok"):
                    break  # libvirt's successful Finish reply went on to A: sign the receipt now
                continue  # a failed Finish: libvirt removes its guest, A's abort follows
            if message.get("t") == "decision":  # A's libvirt rolled back (its Finish failed, or never came)
                _decision(incoming, accepted, commit, lock, message)
                log.info("migration %s: %s aborted; %s discarded here", mid, accepted.src_did, request.vm)
                bridge.close()
                return
            raise TransferError(f"unexpected {message.get('t')!r} from {accepted.src_did} while libvirt migrates")
        timing["finish-sent"] = time.monotonic()
        bridge.wait_channels_done(FINISH_TIMEOUT_S, kinds=("qemu", "nbd"))
        timing["channels-ended"] = time.monotonic()
        with virt.connect(services.config.libvirt.uri) as vconn:
            incoming.held_conn = vconn  # the machine's resume_vm resumes on it (none opened on the pause)
            try:
                _commit_here(incoming, bridge, accepted, commit, lock, state, timing, vconn)
            finally:
                incoming.held_conn = None
        try:  # A's libvirt ends its connection after its Confirm; the ENDs check every byte of it
            bridge.wait_channels_done(FINISH_TIMEOUT_S)
        except MigsecError as exc:
            log.warning("migration %s: libvirt's connection from %s did not end cleanly: %s", mid,
                        accepted.src_did, exc)
    except BaseException as exc:  # noqa: BLE001 - every failure ends in a clean B, or B in doubt
        reason = str(exc) or type(exc).__name__
        log.error("live migration %s failed at the destination: %s", mid, reason)
        if bridge is not None:
            _send_quietly(bridge, {"t": "abort", "reason": peer_reason(exc)})  # the detail: logged above
            bridge.close()
        with lock:
            if commit.state in (RECEIVING, FINISHED_PAUSED, AWAIT_DECISION):
                try:
                    # before libvirt's Finish: discard (once libvirt dropped the guest); after it: in
                    # doubt, the paused copy kept until A's decision (`migsec recover` asks)
                    commit.fail(reason)
                except MigsecError as err:
                    log.error("migration %s: not discarded here: %s (`migsec recover` asks %s)", mid, err,
                              accepted.src_did)
        if not isinstance(exc, (MigsecError, OSError)):  # logged above; anything else is a bug
            raise
        return
    bridge.close()


def _decision(incoming: IncomingMigration, accepted: Accepted, commit: DestinationCommit, lock: Any,
              message: dict) -> str | None:
    """A's signed decision fed to the machine (commit: resume; abort: destroy the paused copy),
    then ledgered (after the resume: it is not on the guest's pause)."""
    token = message.get("jws")
    if message.get("t") != "decision" or not isinstance(token, str):
        raise MigsecError(f"expected the source's decision, got {message.get('t')!r}")
    with lock:
        reply = commit.decision_received(token)  # verifies A's signature first
    incoming.services.audit("decision", incoming.mid, role="destination", peer_token=token,
                            peer_cert_pem=accepted.peer.cert_pem, peer_did=accepted.src_did)
    return reply


def _precreate(commit: DestinationCommit, disks: tuple[DiskPlan, ...], dmap: dict) -> list[str]:
    created: list[str] = []
    for disk in disks:
        src = str(disk.source)
        path = dmap[src]
        if os.path.realpath(path) == os.path.realpath(src):
            raise MigsecError(f"disk {src}: the destination path is the source's own image; refusing")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        create_sparse_image(path, format=disk.format or "raw", virtual_size=disk.virtual_size)
        created.append(path)
        commit.receiving(created_disks=list(created))  # recovery removes only these
    return created


def _commit_here(incoming: IncomingMigration, bridge: Any, accepted: Accepted, commit: DestinationCommit,
                 lock: Any, state: dict, timing: dict, conn: Any) -> None:
    """libvirt finished here (paused): sign the receipt, wait for A's decision, resume on commit."""
    services, mid, request = incoming.services, incoming.mid, accepted.request
    uuid = request.require_plan().vm_uuid
    if not (state.get("finish") and state["finish"][0]):
        raise MigsecError(f"libvirt's Finish did not succeed here: {(state.get('finish') or (0, 0, 'none seen'))[2]}")
    timing["connected"] = time.monotonic()
    here = virt.domain_state(conn, uuid).value
    stats = vmig.job_stats(conn, uuid, completed=True)
    if here != "paused":
        raise MigsecError(f"libvirt reports {request.vm} {here} here after its Finish, not paused")
    timing["checked"] = time.monotonic()
    with lock:  # the memory and disk channels whole, libvirt's up to its Finish3 (rpcdigest)
        receipt = commit.channels_verified(bridge.commit_digests())  # journals restored-paused with it
    bridge.send_control({"t": "receipt", "jws": receipt, "job": stats.as_dict() if stats else {}})
    timing["receipt-sent"] = time.monotonic()
    services.audit("receipt", mid, role="destination", token=receipt, mode="live")  # journaled before it left
    message = _next_message(bridge, REPLY_TIMEOUT_S)
    timing["decision"] = time.monotonic()
    resumed = _decision(incoming, accepted, commit, lock, message)  # commit: journal, resume, Resumed
    if resumed is None:
        log.info("migration %s: %s decided abort after libvirt's Finish; the paused copy is destroyed", mid,
                 accepted.src_did)
        return
    services.audit("resumed", mid, role="destination", token=resumed)
    reply: dict[str, Any] = {"t": "resumed", "jws": resumed}
    if "finished" in timing and "resumed" in timing:
        reply["paused_wait_us"] = int((timing["resumed"] - timing["finished"]) * 1e6)  # records: integers
    _send_quietly(bridge, reply)
    with lock:
        commit.finish()  # journals "done"
    log.info("migration %s: %s runs here (live)", mid, request.vm)
    if "finished" in timing:  # where the pause after libvirt's Finish went, on this host's clock
        log.info("migration %s: paused here after libvirt's Finish: %s", mid, ", ".join(
            f"{k} +{(v - timing['finished']) * 1000:.0f} ms" for k, v in sorted(timing.items(), key=lambda i: i[1])
            if k != "finished"))


def resume_destination(services: Services, mid: str, timing: dict | None = None, *, conn: Any = None) -> None:
    """After A's commit: the guest libvirt's Finish left paused runs here (or stays paused if it
    was paused at A); its permit and run dir go. Idempotent (recovery may repeat it). ``conn``:
    a libvirt connection already open (none is opened on the guest's pause then)."""
    entry = services.journal.get(mid)
    if not entry.decided:
        raise MigsecError(f"migration {mid}: no commit decision here; refusing to resume")
    uuid = entry.plan().vm_uuid
    if conn is None:
        with virt.connect(services.config.libvirt.uri) as fresh:
            _resume(fresh, mid, uuid, entry)
    else:
        _resume(conn, mid, uuid, entry)
    if timing is not None:
        timing["resumed"] = time.monotonic()
    consume_permit(services, uuid)
    remove_run_dir(mid)
    log.info("migration %s: %s resumed here", mid, entry.data.get("domain"))


def _resume(conn: Any, mid: str, uuid: str, entry: JournalEntry) -> None:
    state = virt.domain_state(conn, uuid)
    if state == DomainState.PAUSED and not entry.plan().paused:
        virt.resume_domain(conn, uuid)
    elif not state.active:
        raise MigsecError(f"migration {mid}: {entry.data.get('domain')} is {state.value} here; cannot resume it")


def discard_destination(services: Services, mid: str, *, aborted: bool = False) -> None:
    """Before the commit: no incoming guest left, B's pre-created disks and sockets removed.

    ``aborted`` (A's signed abort Decision, in the session or from recovery): a paused copy
    libvirt's Finish left here is destroyed, and a definition libvirt made for it undefined.
    Otherwise (a local failure) this only waits for libvirt to drop an unfinished incoming guest:
    a guest still here may be the only copy (A's libvirt may have stopped its own), so nothing is
    removed. A running guest is never destroyed.
    """
    entry = services.journal.get(mid)
    if entry.decided:
        raise MigsecError(f"migration {mid} is committed here; refusing to discard it")
    uuid = entry.plan().vm_uuid
    if uuid:
        with virt.connect(services.config.libvirt.uri) as conn:
            if aborted and not entry.data.get("preactive"):
                _destroy_paused_copy(conn, mid, uuid, undefine=not entry.data.get("predefined"))
            else:
                _wait_until_dropped(conn, mid, uuid)
    for path in entry.data.get("created_disks") or []:
        try:
            Path(path).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("migration %s: removing the pre-created disk %s: %s", mid, path, exc)
    consume_permit(services, uuid)
    remove_run_dir(mid)  # "discarded" is journaled by B's commit machine, whose discard action this is


def _state(conn: Any, uuid: str) -> str:
    try:
        return virt.domain_state(conn, uuid).value
    except MigsecError:
        return "absent"


def _wait_until_dropped(conn: Any, mid: str, uuid: str) -> None:
    # libvirt's own rollback removes an unfinished incoming domain when its source connection drops
    deadline = time.monotonic() + 30
    while True:
        state = _state(conn, uuid)
        if state in ("absent", "shutoff"):
            return
        if time.monotonic() > deadline:
            # libvirt finished it here after all (or still holds it): never remove its disks
            raise MigsecError(f"migration {mid}: the incoming domain is {state} here; not discarding it")
        time.sleep(0.5)


def _destroy_paused_copy(conn: Any, mid: str, uuid: str, *, undefine: bool) -> None:
    """A aborted: destroy the incoming copy (paused: it never ran here), then the definition
    libvirt's Finish made for it (PERSIST_DEST), unless the domain was defined here before."""
    deadline = time.monotonic() + 30
    while True:
        state = _state(conn, uuid)
        if state == "running":
            raise MigsecError(f"migration {mid}: the guest runs here; a running guest is never destroyed")
        if state in ("absent", "shutoff"):
            break
        if state == "paused":
            try:
                virt.destroy_domain(conn, uuid)
                log.info("migration %s: destroyed the paused incoming copy (the source aborted)", mid)
            except MigsecError as exc:  # libvirt may be removing it itself
                log.info("migration %s: destroying the paused incoming copy: %s", mid, exc)
        if time.monotonic() > deadline:
            raise MigsecError(f"migration {mid}: the incoming domain is still {state} here")
        time.sleep(0.2)
    if undefine and vmig.is_persistent(conn, uuid):
        virt.undefine_domain(conn, uuid)
        log.info("migration %s: undefined the definition libvirt made for the aborted copy", mid)


# ---- after a crash (``migsec recover``): libvirt's outcome decides at A -------------------------
def left_this_host(services: Services, entry: JournalEntry) -> str | None:
    """A live move A did not see through and did not decide: libvirt's Confirm is the witness.
    Returns the guest's state here ("absent" / "shutoff") when it left this host for B, whose
    copy waits paused (recovery commits: ``SourceCommit.moved_by_libvirt``); None when it is
    still active here (presumed abort: B destroys its paused copy). Refuses while libvirt still
    migrates it. The run directory goes either way."""
    domain = str(entry.data.get("domain"))
    with virt.connect(services.config.libvirt.uri) as conn:
        if vmig.migration_running(conn, domain):
            raise MigsecError(f"libvirt still migrates {domain} here; try again when its job ended")
        state = domain_state(conn, domain)
    remove_run_dir(entry.migration_id)
    return state if state in ("absent", "shutoff") else None


# ---- the hook's permit (B) ------------------------------------------------------------------------
def permit_dir(services: Services) -> Path:
    return Path(services.config.paths.state_dir) / "permits"


def write_permit(services: Services, mid: str, uuid: str, name: str) -> None:
    """A short-lived permit the ``migrate begin`` hook checks and consumes: libvirt's incoming
    migration of this uuid is migsec's own (bound to the migration id, not a global switch)."""
    permit.write_permit(permit_dir(services), migration_id=mid, uuid=uuid, name=name, ttl=PERMIT_TTL_S)


def consume_permit(services: Services, uuid: str) -> None:
    if uuid:
        permit.remove_permit(permit_dir(services), uuid)

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
    A -> B  {"t": "channels-done"}       migrateToURI3 returned: libvirt's Finish/Confirm committed
    B -> A  {"t": "receipt", "jws", "job"}  Receipt(state "running-live", SHA-256 of every channel
                                          per direction, as B saw them); "job" = domjobinfo --completed
    A -> B  {"t": "decision", "jws"}     A checked the digests against its own; commit
    B -> A  {"t": "resumed", "jws"}
    or, on any failure: A -> B decision abort / B -> A {"t": "abort", "reason"}

libvirt's Finish/Confirm is the commit: before it, libvirt rolls back (the guest runs
on at A) and migsec removes its sockets and B's pre-created disks; after it the guest
is B's. The journal and ledger record it like a cold move (receipt, decision, resumed).
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
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from migsec.migration.jobs import MigrationAborted
from migsec.errors import IntegrityError, MigrationFailed, MigsecError, TransferError
from migsec.protocol.errors import parse_peer_reason, peer_error_text, peer_reason

if TYPE_CHECKING:
    from migsec.migration.destination import IncomingMigration
    from migsec.migration.journal import JournalEntry
    from migsec.migration.link import Accepted, SourceSession
    from migsec.daemon.services import Services
    from migsec.migration.source import OutgoingMigration
    from migsec.protocol.plan import DiskPlan

log = logging.getLogger("migsecd.live")
RUN_ROOT = Path("/run/migsec")
READY_TIMEOUT_S = 120
FINISH_TIMEOUT_S = 60
REPLY_TIMEOUT_S = 120
TARGET_WAIT_S = 30
PERMIT_TTL_S = 600
LIVE_STATE = "running-live"


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
    from migsec.virt.migrate import system_qemu_owner

    owner = system_qemu_owner()
    return None if owner is None else owner.gid


def remove_run_dir(migration_id: str) -> None:
    shutil.rmtree(run_dir(migration_id), ignore_errors=True)


def _uris(migration_id: str) -> dict[str, str]:
    d = run_dir(migration_id)
    return {"libvirt": str(d / "libvirt.sock"), "qemu": str(d / "qemu.sock"), "nbd": str(d / "nbd.sock")}


# ---- A: the source ------------------------------------------------------------------------------
def run_source(job: OutgoingMigration, conn: Any, session: SourceSession) -> dict:
    """A's side after the handshake (``job`` is the OutgoingMigration)."""
    from migsec import virt
    from migsec.migration.bridge import ChannelBridge
    from migsec.protocol import Decision, Receipt, Resumed, token_hash
    from migsec.virt import migrate as vmig

    services, mid, domain = job.services, job.mid, job.domain
    info = virt.describe_domain(conn, domain)
    job.was_paused = info.state.value == "paused"
    paths = _uris(mid)
    bridge = ChannelBridge(session.sock, session.records, role="source", peer_name=job.dest_did)
    committed = False
    try:
        qemu_gid = _qemu_gid()
        make_run_dir(mid, group=qemu_gid, group_mode=0o010)
        job.journal("streaming", attempt=0, mode="live", run_dir=str(run_dir(mid)))
        for kind, path in paths.items():
            bridge.listen(kind, path, group=qemu_gid if kind == "nbd" else None)  # QEMU connects to nbd.sock
        _expect(bridge, job, "ready", READY_TIMEOUT_S)  # B pre-created the disks, wrote the hook's permit
        job.step(f"{job.dest_did} is ready (disks pre-created sparse); libvirt migrates {domain} live "
                 "through the session")
        flags = vmig.live_flags(persistent=bool(job.options.get("persistent")),
                                undefine_source=bool(job.options.get("undefine_source")), paused=job.was_paused)
        targets = [d.target for d in job.request.require_plan().mirrored_disks]
        job.abort.check()  # an abort while B prepared: libvirt has not started
        mover = _Call(lambda: _migrate(services, domain, paths, flags, job.bandwidth(), targets))
        _watch(job, conn, mover, bridge)
        mover.join()  # raises libvirt's error: libvirt rolled back
        committed = True  # libvirt's Finish (B) and Confirm (A) are done: the guest is B's
        bridge.stop_listening()
        bridge.wait_channels_done(FINISH_TIMEOUT_S)
        bridge.send_control({"t": "channels-done"})
        message = bridge.recv_control(REPLY_TIMEOUT_S)
        if message.get("t") == "abort":
            raise TransferError(f"{job.dest_did} aborted: {peer_error_text(parse_peer_reason(message.get('reason')))}")
        token = message.get("jws")
        if message.get("t") != "receipt" or not isinstance(token, str):
            raise TransferError(f"expected a receipt from {job.dest_did}, got {message.get('t')!r}")
        b_stats = message.get("job")
        stats: dict[str, Any] = b_stats if isinstance(b_stats, dict) else {}
        services.audit("receipt", mid, role="source", mode="live", peer_token=token,
                       peer_cert_pem=session.peer.cert_pem, peer_did=job.dest_did)
        receipt = Receipt.verify(token, session.peer.public_key, migration_id=mid)
        mine = bridge.digests()
        problems = _receipt_problems(receipt, job, session, mine)
        job.journal("receipt-received", receipt=token, digests={k: v.hex() for k, v in mine.items()})
        if problems:
            raise IntegrityError(f"{domain} runs at {job.dest_did} (libvirt committed) but its receipt "
                                 f"does not match what left here: {'; '.join(problems)}")
        decision = Decision(migration_id=mid, src_did=services.did, dest_did=job.dest_did, decision="commit",
                            issued_at=services.clock(), receipt_hash=token_hash(token)).sign(services.identity.key)
        job.journal("committed", decision=decision, how="libvirt")
        services.audit("decision", mid, role="source", token=decision, outcome="commit", mode="live")
        bridge.send_control({"t": "decision", "jws": decision})
        answer = _expect(bridge, job, "resumed", REPLY_TIMEOUT_S)
        resumed = Resumed.verify(answer, session.peer.public_key, migration_id=mid)
        if resumed.decision_hash != token_hash(decision):
            raise IntegrityError(f"{job.dest_did}'s Resumed answers another decision")
        services.audit("resumed", mid, role="source", peer_token=answer, peer_cert_pem=session.peer.cert_pem,
                       peer_did=job.dest_did)
        _release_source(job, conn)
        job.journal("released")
        job.journal("done", resumed=answer)
    except BaseException as exc:
        if committed:
            bridge.close()
            remove_run_dir(mid)
            if job.services.journal.get(mid).phase not in ("committed", "released", "done"):
                job.journal("committed", how="libvirt", problem=str(exc)[:500])
            raise MigrationFailed(f"{domain} moved to {job.dest_did} (libvirt committed it) but the "
                                  f"exchange after it failed: {exc}") from exc
        try:
            _rollback(job, conn, exc, bridge)
        finally:
            bridge.close()
            remove_run_dir(mid)
        raise
    bridge.close()
    remove_run_dir(mid)
    job.bytes_on_wire = bridge.wire_sent + bridge.wire_received
    job.step(f"{domain} is running at {job.dest_did}; every channel's SHA-256 matches B's receipt")
    result = job.result()
    if isinstance(stats.get("downtime_ms"), int):
        result["downtime_seconds"] = stats["downtime_ms"] / 1000  # libvirt's figure (B's completed job)
    result.update(mode="live", job=stats, channels=bridge.channel_bytes())
    return result


def _migrate(services: Services, domain: str, paths: dict, flags: int, bandwidth: int | None,
             targets: list[str]) -> None:
    from migsec import virt
    from migsec.virt import migrate as vmig

    with virt.connect(services.config.libvirt.uri) as conn:
        vmig.migrate_live(conn, domain, dconnuri=f"qemu+unix:///system?socket={paths['libvirt']}",
                          migrate_uri=f"unix://{paths['qemu']}", disks_uri=f"unix://{paths['nbd']}",
                          flags=flags, bandwidth=bandwidth, disks=targets or None)


def _watch(job: OutgoingMigration, conn: Any, mover: "_Call", bridge: Any) -> None:
    """Progress from libvirt's job while it migrates; --timeout, an operator's abort (`migsec jobs
    abort`, Ctrl-C of `migsec migrate`) and a failed session abort the job: libvirt rolls back."""
    from migsec.virt import migrate as vmig

    while not mover.done.wait(0.5):
        aborted = job.abort.reason is not None
        if bridge.error is not None or aborted or (job.deadline is not None and time.monotonic() > job.deadline):
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
            return
        stats = vmig.job_stats(conn, job.domain)
        if stats is not None and stats.data_total:
            job.emit({"event": "progress", "phase": "live", "done": int(stats.data_processed or 0),
                      "total": int(stats.data_total)})


def _receipt_problems(receipt: Any, job: OutgoingMigration, session: SourceSession, mine: dict) -> list[str]:
    problems = []
    if (receipt.src_did, receipt.dest_did) != (job.services.did, job.dest_did):
        problems.append(f"it is between {receipt.src_did} and {receipt.dest_did}")
    if receipt.transcript_hash != session.keys.transcript_hash:
        problems.append("it names another session (transcript hash)")
    if receipt.state != LIVE_STATE:
        problems.append(f"its state is {receipt.state!r}")
    theirs = dict(receipt.streams)
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            problems.append(f"channel {name}: here {_short(mine.get(name))}, there {_short(theirs.get(name))}")
    return problems


def _short(digest: bytes | None) -> str:
    return "none" if digest is None else digest.hex()[:16] + "..."


def _expect(bridge: Any, job: OutgoingMigration, kind: str, timeout: float) -> Any:
    message = bridge.recv_control(timeout)
    if message.get("t") == "abort":
        raise TransferError(f"{job.dest_did} aborted: {peer_error_text(parse_peer_reason(message.get('reason')))}")
    if message.get("t") != kind:
        raise TransferError(f"expected {kind} from {job.dest_did}, got {message.get('t')!r}")
    return message.get("jws", message)


def _rollback(job: OutgoingMigration, conn: Any, cause: BaseException, bridge: Any) -> None:
    """Before libvirt's commit: libvirt resumed the guest here; make sure, journal, tell B."""
    from migsec.migration.source import restart_at_source
    from migsec.protocol import Decision

    reason = str(cause) or type(cause).__name__
    log.warning("live migration %s of %s failed, rolling back: %s", job.mid, job.domain, reason)
    code = "integrity" if isinstance(cause, IntegrityError) else "aborted"  # all B learns of the cause
    from migsec.migration.source import domain_state

    state = domain_state(conn, job.domain)
    if state == "paused" and not job.was_paused:
        # libvirt resumes the source itself when it rolls back; a source it left paused means it
        # could not tell whether B's Finish ran: resuming here could run the guest twice
        raise MigrationFailed(f"live migration of {job.domain} failed ({reason}) and libvirt left it paused "
                              f"here: check {job.dest_did} (`virsh list` there) before resuming it")
    job.journal("aborted", reason=reason[:1000])
    try:
        how = restart_at_source(conn, job.domain, None, paused=job.was_paused)
    except MigsecError as exc:
        log.error("migration %s: %s is not running here after the rollback: %s", job.mid, job.domain, exc)
        raise
    job.journal("rolled-back", how=how)
    job.step(f"rolled back: {job.domain} {how} at {job.services.did}")
    decision = Decision(migration_id=job.mid, src_did=job.services.did, dest_did=job.dest_did, decision="abort",
                        issued_at=job.services.clock(), reason=peer_reason(code)).sign(job.services.identity.key)
    job.services.audit("decision", job.mid, role="source", token=decision, outcome="abort", reason=reason[:1000])
    try:
        bridge.send_control({"t": "decision", "jws": decision})  # B cleans up at once
    except MigsecError:
        pass  # B cleans up when the session ends, or asks (`migsec recover`)
    if isinstance(cause, MigsecError) and not isinstance(cause, MigrationFailed):
        raise MigrationFailed(f"live migration of {job.domain} failed and was rolled back: {cause}",
                              rolled_back=True) from cause


def _release_source(job: OutgoingMigration, conn: Any) -> None:
    """libvirt stopped (and with --undefinesource undefined) the source copy: its disks go too,
    or the definition kept here is marked as given away (the same release as a cold move's)."""
    from migsec.migration.release import release_source

    job.released = release_source(job.services, conn, job.mid, job.domain, job.options, job.dest_did,
                                  plan=job.request.require_plan())
    for disk in job.released["disks_not_removed"]:
        job.step(f"warning: the moved disk {disk['path']} could not be removed here: {disk['error']}")


class _Call:
    """Run ``fn`` in a thread; ``join()`` re-raises its error."""

    def __init__(self, fn: Any) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None

        def body() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised by join()
                self.error = exc
            finally:
                self.done.set()

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
    """B's libvirt RPC proxy on one channel: live-rpc's RpcFilter, its refusals audited."""

    def __init__(self, services: Services, mid: str, policy: Any, state: dict,
                 mark: Any = None) -> None:
        from migsec.protocol.libvirt_rpc import RpcFilter

        self.services, self.mid, self.state = services, mid, state
        self.filter = RpcFilter(policy)
        self.mark = mark  # the bridge's timeline (ChannelBridge.mark), or None

    def _events(self, events: list) -> None:
        from migsec.protocol import libvirt_rpc as rpc

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


def serve_destination(incoming: IncomingMigration, conn: socket.socket, accepted: Accepted) -> None:
    """B's side of a live move (``incoming`` is the IncomingMigration, journaled ``accepted``)."""
    from migsec.migration.bridge import ChannelBridge
    from migsec.migration.dataplane import disk_map
    from migsec.protocol import RecordLayer
    from migsec.protocol.libvirt_rpc import RpcPolicy
    from migsec.virt.incoming import FIRMWARE_DIRS, incoming_domain_xml

    services, mid, request = incoming.services, incoming.mid, accepted.request
    records = RecordLayer(accepted.keys, "destination")
    state: dict = {}
    opened: set[str] = set()
    bridge: Any = None
    try:
        plan = request.require_plan()
        disks = plan.mirrored_disks
        dmap = disk_map(services, [str(d.source) for d in disks])
        paths = _uris(mid)
        make_run_dir(mid, group=_qemu_gid(), group_mode=0o030)  # B's QEMU creates its sockets here
        incoming.journal("receiving", attempt="live", mode="live", run_dir=str(run_dir(mid)), created_disks=[])
        created = _precreate(incoming, disks, dmap)
        write_permit(services, mid, plan.vm_uuid, request.vm)
        network = services.config.network
        policy = RpcPolicy(
            domain_name=request.vm, domain_uuid=plan.vm_uuid,
            migrate_uri=f"unix://{paths['qemu']}", disks_uri=f"unix://{paths['nbd']}",
            rewrite_xml=partial(incoming_domain_xml, disk_map=dmap, network_map=dict(network.map) or None,
                                bridge_map=dict(network.bridge_map) or None, expected_name=request.vm,
                                expected_uuid=plan.vm_uuid,
                                boot_dirs=FIRMWARE_DIRS + tuple(services.config.storage.boot_dirs)))
        libvirtd = libvirt_socket(services.config.libvirt.uri)

        def connect_target(kind: str, channel: int) -> tuple[socket.socket, Any]:
            if kind in opened and kind == "libvirt":
                raise TransferError("a second libvirt connection in one migration")
            opened.add(kind)
            if kind == "libvirt":
                return _connect_unix(libvirtd, 5), _RpcChannel(services, mid, policy, state, bridge.mark)
            return _connect_unix(paths[kind], TARGET_WAIT_S), None

        bridge = ChannelBridge(conn, records, role="destination", peer_name=accepted.src_did,
                               connect_target=connect_target, rate=accepted.bandwidth)
        bridge.send_control({"t": "ready", "disks": len(created)})
        message = bridge.recv_control(24 * 3600)  # as long as libvirt migrates; keepalives watch the link
        if message.get("t") == "decision":
            _abort_decision(incoming, message, accepted)
            raise TransferError(f"{accepted.src_did} aborted the migration")
        if message.get("t") != "channels-done":
            raise TransferError(f"expected channels-done from {accepted.src_did}, got {message.get('t')!r}")
        bridge.wait_channels_done(FINISH_TIMEOUT_S)
        _commit_here(incoming, bridge, accepted, state)
    except BaseException as exc:  # noqa: BLE001 - every failure ends in a clean B
        reason = str(exc) or type(exc).__name__
        log.error("live migration %s failed at the destination: %s", mid, reason)
        entry = services.journal.get(mid)
        if bridge is not None:
            try:
                bridge.send_control({"t": "abort", "reason": peer_reason(exc)})  # the detail: logged above
            except MigsecError:
                pass
            bridge.close()
        if not entry.decided and not entry.terminal:
            discard_destination(services, mid, reason=reason)
        if not isinstance(exc, (MigsecError, OSError)):  # logged above; anything else is a bug
            raise
        return
    bridge.close()


def _precreate(incoming: IncomingMigration, disks: tuple[DiskPlan, ...], dmap: dict) -> list[str]:
    from migsec.virt.migrate import create_sparse_image

    created: list[str] = []
    for disk in disks:
        src = str(disk.source)
        path = dmap[src]
        if os.path.realpath(path) == os.path.realpath(src):
            raise MigsecError(f"disk {src}: the destination path is the source's own image; refusing")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        create_sparse_image(path, format=disk.format or "raw", virtual_size=disk.virtual_size)
        created.append(path)
        incoming.journal("receiving", created_disks=list(created))  # recovery removes only these
    return created


def _commit_here(incoming: IncomingMigration, bridge: Any, accepted: Accepted, state: dict) -> None:
    """libvirt finished here: check the guest, sign the receipt, wait for A's commit, confirm."""
    from migsec import virt
    from migsec.protocol import Decision, Receipt, Resumed, token_hash
    from migsec.virt import migrate as vmig

    services, mid, request = incoming.services, incoming.mid, accepted.request
    plan = request.require_plan()
    uuid = plan.vm_uuid
    with virt.connect(services.config.libvirt.uri) as conn:
        running = virt.domain_state(conn, uuid).value
        stats = vmig.job_stats(conn, uuid, completed=True)
    wanted = "paused" if plan.paused else "running"
    if running != wanted:
        raise MigsecError(f"libvirt reports {request.vm} {running} here after the migration, not {wanted}")
    if state.get("finish") and not state["finish"][0]:
        raise MigsecError(f"libvirt's Finish failed here: {state['finish'][2]}")
    digests = bridge.digests()
    receipt = Receipt(migration_id=mid, src_did=accepted.src_did, dest_did=services.did, streams=digests,
                      transcript_hash=accepted.keys.transcript_hash, issued_at=services.clock(),
                      state=LIVE_STATE).sign(services.identity.key)
    incoming.journal("received", restored=request.vm, receipt=receipt,
                     digests={k: v.hex() for k, v in digests.items()})
    services.audit("receipt", mid, role="destination", token=receipt, mode="live")
    bridge.send_control({"t": "receipt", "jws": receipt, "job": stats.as_dict() if stats else {}})
    message = bridge.recv_control(REPLY_TIMEOUT_S)
    token = message.get("jws")
    if message.get("t") != "decision" or not isinstance(token, str):
        raise MigsecError(f"expected the source's decision, got {message.get('t')!r}")
    services.audit("decision", mid, role="destination", peer_token=token, peer_cert_pem=accepted.peer.cert_pem,
                   peer_did=accepted.src_did)
    decision = Decision.verify(token, accepted.peer.public_key, migration_id=mid)
    if decision.decision != "commit" or decision.receipt_hash != token_hash(receipt):
        # libvirt already committed: the guest runs here whatever A says; record A's view
        log.error("migration %s: %s decided %s after libvirt committed the guest here", mid,
                  accepted.src_did, decision.decision)
    incoming.journal("commit-received", decision=token)
    resumed = Resumed(migration_id=mid, src_did=accepted.src_did, dest_did=services.did,
                      decision_hash=token_hash(token), issued_at=services.clock()).sign(services.identity.key)
    incoming.journal("resumed", resumed=resumed)
    services.audit("resumed", mid, role="destination", token=resumed)
    bridge.send_control({"t": "resumed", "jws": resumed})
    consume_permit(services, uuid)
    remove_run_dir(mid)
    incoming.journal("done")
    log.info("migration %s: %s runs here (live)", mid, request.vm)


def _abort_decision(incoming: IncomingMigration, message: dict, accepted: Accepted) -> None:
    token = message.get("jws")
    if isinstance(token, str):
        incoming.services.audit("decision", incoming.mid, role="destination", peer_token=token,
                                peer_cert_pem=accepted.peer.cert_pem, peer_did=accepted.src_did)


def discard_destination(services: Services, mid: str, *, reason: str = "", record_phase: bool = True) -> None:
    """Before the commit: no incoming guest left, B's pre-created disks and sockets removed."""
    from migsec import virt
    from migsec.migration.jobs import record

    entry = services.journal.get(mid)
    if entry.decided:
        raise MigsecError(f"migration {mid} is committed here; refusing to discard it")
    uuid = entry.plan().vm_uuid
    if uuid:
        # libvirt's own rollback removes the incoming domain when its source connection drops
        deadline = time.monotonic() + 30
        with virt.connect(services.config.libvirt.uri) as conn:
            while True:
                try:
                    state = virt.domain_state(conn, uuid).value
                except MigsecError:
                    state = "absent"
                if state in ("absent", "shutoff"):
                    break
                if time.monotonic() > deadline:
                    # libvirt finished it here after all (or still holds it): never remove its disks
                    raise MigsecError(f"migration {mid}: the incoming domain is {state} here; not discarding it")
                time.sleep(0.5)
    for path in entry.data.get("created_disks") or []:
        try:
            Path(path).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("migration %s: removing the pre-created disk %s: %s", mid, path, exc)
    consume_permit(services, uuid)
    remove_run_dir(mid)
    if record_phase:
        record(services, mid, "destination", "discarded", reason=reason[:500] or "live migration failed")


# ---- after a crash (``migsec recover``): libvirt's own outcome decides ---------------------------------
def recover_source(services: Services, entry: JournalEntry) -> str | None:
    """A live move A did not see through. libvirt's Confirm is the commit: a guest no longer
    active here went to B (journal it committed and released); one still active here stays
    (None: the ordinary presumed-abort recovery rolls back and tells B)."""
    from migsec import virt
    from migsec.migration.jobs import record
    from migsec.migration.release import release_source
    from migsec.migration.source import domain_state

    mid, domain = entry.migration_id, str(entry.data.get("domain"))
    remove_run_dir(mid)
    with virt.connect(services.config.libvirt.uri) as conn:
        state = domain_state(conn, domain)
        if state not in ("absent", "shutoff"):
            return None
        record(services, mid, "source", "committed", how="libvirt (found by recover: the guest left this host)")
        release_source(services, conn, mid, domain, dict(entry.data.get("options") or {}),
                       str(entry.data.get("peer")), plan=entry.plan())
    record(services, mid, "source", "released")
    record(services, mid, "source", "done")
    return f"committed by libvirt: {domain} left this host for {entry.data.get('peer')}"


def recover_destination(services: Services, entry: JournalEntry) -> str | None:
    """A live move B did not see through: a guest libvirt finished here runs here (journal the
    commit); otherwise None, and the ordinary recovery asks A (whose abort discards)."""
    from migsec import virt
    from migsec.migration.jobs import record

    mid = entry.migration_id
    uuid = entry.plan().vm_uuid
    try:
        with virt.connect(services.config.libvirt.uri) as conn:
            state = virt.domain_state(conn, uuid).value
    except MigsecError:
        state = "absent"
    if state != "running":
        return None  # never finished here (libvirt drops an unfinished incoming guest)
    record(services, mid, "destination", "commit-received", how="libvirt (found by recover)")
    record(services, mid, "destination", "resumed")
    consume_permit(services, uuid)
    remove_run_dir(mid)
    record(services, mid, "destination", "done")
    return f"committed by libvirt: {entry.data.get('domain')} runs here"


# ---- the hook's permit (B) ------------------------------------------------------------------------
def permit_dir(services: Services) -> Path:
    return Path(services.config.paths.state_dir) / "permits"


def write_permit(services: Services, mid: str, uuid: str, name: str) -> None:
    """A short-lived permit the ``migrate begin`` hook checks and consumes: libvirt's incoming
    migration of this uuid is migsec's own (bound to the migration id, not a global switch)."""
    from migsec.hooks.permit import write_permit as write

    write(permit_dir(services), migration_id=mid, uuid=uuid, name=name, ttl=PERMIT_TTL_S)


def consume_permit(services: Services, uuid: str) -> None:
    from migsec.hooks.permit import remove_permit

    if uuid:
        remove_permit(permit_dir(services), uuid)

"""Pieces of the live mode that need no lab: the disk facts, the socket paths, sparse pre-creation."""
from __future__ import annotations

import json
import subprocess
import time
from types import SimpleNamespace

import pytest

from migsec.migration import live
from migsec.errors import MigsecError
from migsec.virt import migrate as vmig


def test_libvirt_socket_of_the_local_daemon_only():
    assert live.libvirt_socket("qemu:///system") == "/run/libvirt/libvirt-sock"
    assert live.libvirt_socket("qemu+unix:///system?socket=/x/sock") == "/x/sock"
    with pytest.raises(MigsecError, match="local libvirtd"):
        live.libvirt_socket("qemu+tcp://elsewhere/system")


def test_live_flags_ask_for_p2p_live_non_shared_disk():
    import libvirt

    flags = vmig.live_flags(persistent=True, undefine_source=True)
    for name in ("VIR_MIGRATE_LIVE", "VIR_MIGRATE_PEER2PEER", "VIR_MIGRATE_NON_SHARED_DISK",
                 "VIR_MIGRATE_PERSIST_DEST", "VIR_MIGRATE_UNDEFINE_SOURCE"):
        assert flags & getattr(libvirt, name), name
    assert not flags & libvirt.VIR_MIGRATE_TUNNELLED
    assert not vmig.live_flags(persistent=False, undefine_source=False) & libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    # always paused at B after libvirt's Finish: B resumes it only on A's signed commit
    assert vmig.live_flags(persistent=False, undefine_source=False) & libvirt.VIR_MIGRATE_PAUSED


def test_sparse_image_has_the_virtual_size_and_nothing_allocated_and_never_overwrites(tmp_path):
    path = tmp_path / "d.qcow2"
    vmig.create_sparse_image(str(path), format="qcow2", virtual_size=2 << 30)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["virtual-size"] == 2 << 30 and info["format"] == "qcow2"
    assert path.stat().st_blocks * 512 < 1 << 20
    before = path.read_bytes()
    with pytest.raises(MigsecError, match="already there"):
        vmig.create_sparse_image(str(path), format="qcow2", virtual_size=1 << 20)
    assert path.read_bytes() == before
    with pytest.raises(MigsecError, match="unknown image format"):
        vmig.create_sparse_image(str(tmp_path / "e"), format="vhd?", virtual_size=1 << 20)


def test_downtime_is_libvirts_plus_the_paused_wait_and_absent_figures_stay_absent():
    both = live.downtime({"downtime_ms": 150}, {"paused_wait_us": 42_500})
    assert both == {"libvirt_downtime_ms": 150, "paused_wait_ms": 42.5, "downtime_seconds": 0.193}
    assert live.downtime({"downtime_ms": 150}, {}) == {"libvirt_downtime_ms": 150}
    assert live.downtime({}, {"paused_wait_us": 4.5}) == {}
    assert live.downtime({"downtime_ms": 1}, {"paused_wait_us": -3}) == {"libvirt_downtime_ms": 1}


# ---- A's watcher: when the move may commit before migrateToURI3 returns ---------------------------
class _Bridge:
    """The control queue of a ChannelBridge (peer messages and LocalEvents), nothing else."""

    def __init__(self, *, finish3_ok: bool) -> None:
        import queue

        self.q: queue.Queue = queue.Queue()
        self.error = None
        self._ok = finish3_ok

    def post_local(self, event) -> None:
        self.q.put(event)

    def recv_control(self, timeout: float):
        import queue

        from migsec.migration.bridge import BridgeError
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            raise BridgeError("timeout") from None

    def finish3_ok(self) -> bool:
        return self._ok


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setattr(live, "_progress", lambda job, conn: None)  # libvirt's job stats: not here


def _watched(*, finish3_ok: bool, qemu_exits: bool, migrate_s: float):
    import threading
    from types import SimpleNamespace

    from migsec.migration import live
    from migsec.migration.bridge import LocalEvent
    from migsec.migration.jobs import AbortSwitch

    bridge = _Bridge(finish3_ok=finish3_ok)
    watch = SimpleNamespace(exited=threading.Event())
    job = SimpleNamespace(mid="m1", domain="vm1", dest_did="cloud-b", abort=AbortSwitch(), deadline=None,
                          emit=lambda e: None)
    mover = live._Call(lambda: time.sleep(migrate_s), on_done=lambda: bridge.post_local(LocalEvent(t="migrated")))
    bridge.post_local({"t": "receipt", "jws": "token"})  # B's receipt, as its Finish reply went on
    if qemu_exits:
        watch.exited.set()
        bridge.post_local(LocalEvent(t="qemu-exited"))
    started = time.monotonic()
    held, early = live._watch(job, None, mover, bridge, watch)
    return held, early, mover, time.monotonic() - started


def test_a_commits_on_bs_receipt_once_its_qemu_exited_after_a_successful_finish3():
    held, early, mover, took = _watched(finish3_ok=True, qemu_exits=True, migrate_s=5)
    assert held == {"t": "receipt", "jws": "token"} and early
    assert not mover.done.is_set() and took < 2  # libvirt's Confirm is still running


@pytest.mark.parametrize("finish3_ok, qemu_exits", [(True, False), (False, True)])
def test_without_both_signals_a_waits_for_libvirt(finish3_ok, qemu_exits):
    # the QEMU still runs (a lost Finish reply: libvirt resumes it), or it exited but no successful
    # Finish3 reply crossed this session (a crash): only libvirt's outcome decides
    held, early, mover, _ = _watched(finish3_ok=finish3_ok, qemu_exits=qemu_exits, migrate_s=0.6)
    assert mover.done.is_set() and not early
    assert held == {"t": "receipt", "jws": "token"}  # kept for the commit (or refused by the rollback)


def test_an_abort_that_libvirt_does_not_end_never_counts_as_an_early_commit(monkeypatch):
    # the operator aborts with B's receipt already here; libvirt's job does not end within the
    # wait: A must not take that for the early commit (its QEMU may still run)
    monkeypatch.setattr(live, "_abort_libvirt", lambda job, conn, mover, bridge, aborted: None)
    import threading
    from types import SimpleNamespace

    from migsec.migration.jobs import AbortSwitch

    bridge = _Bridge(finish3_ok=True)
    bridge.post_local({"t": "receipt", "jws": "token"})
    job = SimpleNamespace(mid="m1", domain="vm1", dest_did="cloud-b", abort=AbortSwitch(), deadline=None,
                          emit=lambda e: None)
    job.abort.request("operator")
    mover = live._Call(lambda: time.sleep(3))
    held, early = live._watch(job, None, mover, bridge, SimpleNamespace(exited=threading.Event()))
    assert held == {"t": "receipt", "jws": "token"} and not early and not mover.done.is_set()


def test_the_start_sweep_removes_run_dirs_of_journaled_migrations_only(tmp_path, monkeypatch):
    monkeypatch.setattr(live, "RUN_ROOT", tmp_path)
    left = live.make_run_dir("a" * 32)
    (left / "nbd.sock").write_text("")  # a socket nobody listens on any more
    live.make_run_dir("b" * 32)  # not in this host's journal: not migsec's to remove
    (tmp_path / "migsecd.sock").write_text("")
    (tmp_path / "permits").mkdir()
    assert live.sweep_run_dirs({"a" * 32, "c" * 32, "permits-not"}.__contains__) == ["a" * 32]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b" * 32, "migsecd.sock", "permits"]
    assert live.sweep_run_dirs({"a" * 32}.__contains__) == []


def test_the_start_sweep_without_a_run_root_removes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(live, "RUN_ROOT", tmp_path / "absent")
    assert live.sweep_run_dirs({"a" * 32}.__contains__) == []

"""Pieces of the live mode that need no lab: the disk facts, the socket paths, sparse pre-creation."""
from __future__ import annotations

import json
import subprocess
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

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


def test_receipt_problems_name_every_channel_that_differs_and_a_foreign_session():
    from datetime import datetime, timezone

    from migsec.protocol import Receipt

    th = b"\x01" * 32
    mine = {"qemu.5.a2b": b"\x02" * 32, "qemu.5.b2a": b"\x03" * 32, "nbd.3.a2b": b"\x04" * 32}
    job = SimpleNamespace(services=SimpleNamespace(did="cloud-a.example"), dest_did="cloud-b.example")
    session = SimpleNamespace(keys=SimpleNamespace(transcript_hash=th))

    def receipt(streams, transcript=th, state=live.LIVE_STATE):
        return Receipt(migration_id="m1", src_did="cloud-a.example", dest_did="cloud-b.example", streams=streams,
                       transcript_hash=transcript, issued_at=datetime.now(timezone.utc), state=state)

    assert live._receipt_problems(receipt(mine), job, session, mine) == []
    changed = {**mine, "qemu.5.a2b": b"\x09" * 32}
    problems = live._receipt_problems(receipt(changed), job, session, mine)
    assert len(problems) == 1 and "qemu.5.a2b" in problems[0]
    missing = {k: v for k, v in mine.items() if k != "nbd.3.a2b"}
    assert "nbd.3.a2b" in " ".join(live._receipt_problems(receipt(missing), job, session, mine))
    assert "transcript" in " ".join(live._receipt_problems(receipt(mine, b"\x07" * 32), job, session, mine))
    assert "restored-paused" in " ".join(live._receipt_problems(receipt(mine, state="restored-paused"), job,
                                                                session, mine))

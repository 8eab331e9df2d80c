"""End-to-end: a guest whose disk file name holds ``|`` and ``,`` moves cold and live.

Those two characters were the separators of Mig_Rqst version 1's string options (files joined
with ``|``, tags with ``,``), so such a disk broke a migration; the typed plan carries the path
unchanged. The guest's own disk check on B proves the blocks arrived where B's libvirt opens them.
"""
from __future__ import annotations

import secrets

import pytest

from tests.e2e.conftest import GUEST_DISK, GUEST_MEMORY, GUEST_REGION_MIB, GuestHandle, migrate
from tests.e2e.test_migration import assert_state_intact, audit_ok, journal

pytestmark = pytest.mark.lab


@pytest.fixture
def awkward_guest(dep):
    """A fresh guest on host a whose disk is ``<name>|plan,test.qcow2``."""
    name = "p" + secrets.token_hex(3)
    lab, h = dep.lab, dep.lab.host("a")
    g = lab.define_guest("a", name, memory=GUEST_MEMORY, disk_size=GUEST_DISK, region_mib=GUEST_REGION_MIB)
    awkward = g.disk.with_name(f"{name}|plan,test.qcow2")
    g.disk.rename(awkward)
    xml = h.image_dir / f"{name}.xml"
    text = xml.read_text()
    assert text.count(f"'{g.disk}'") + text.count(f'"{g.disk}"') == 1, "the disk path is in the XML once"
    xml.write_text(text.replace(str(g.disk), str(awkward)))
    h.virsh("undefine", name)  # the lab's XML has no <uuid>: define it anew
    h.virsh("define", str(xml))
    lab.start_guest("a", name, timeout=120)
    handle = GuestHandle(dep, name)
    handle.wait_counter_beyond("a", 3)
    yield handle, awkward.name
    for host in ("a", "b"):
        dep.lab.host(host).virsh("destroy", name, check=False)
        dep.lab.host(host).virsh("undefine", name, check=False)


@pytest.mark.parametrize("mode", ["cold", "live"])
def test_a_disk_path_with_a_pipe_and_a_comma_migrates(dep, awkward_guest, mode):
    guest, file_name = awkward_guest
    a, b = dep["a"], dep["b"]
    extra = ("--live",) if mode == "live" else ()
    code, result, err = migrate(dep, guest.name, *extra, "--persistent", "--undefinesource")
    assert code == 0, (err, result)
    assert guest.state("a") == "absent" and guest.state("b") == "running"
    assert not (dep.lab.host("a").image_dir / file_name).exists()  # --undefinesource removed the top image
    on_b = dep.lab.host("b").image_dir / file_name
    assert on_b.exists()
    assert str(on_b) in dep.lab.host("b").virsh("domblklist", guest.name)
    last_on_a = guest.console("a").counters[-1]
    assert not guest.console("b").boots, "the guest rebooted on B"
    assert_state_intact(guest, "b", last_on_a)  # counter, memory checksum and disk blocks
    mid = result["migration_id"]
    assert journal(a, mid)["phase"] == "done" and journal(b, mid)["phase"] == "done"
    for d in (a, b):
        audit_ok(d)

"""The AZ's typed plan for a real libvirt domain description, and the plan as the journal keeps it."""
from __future__ import annotations

import pytest

from migsec import virt
from migsec.auth.servers import plan_for, vm_attributes
from migsec.migration.dataplane import request_files
from migsec.errors import JournalError, MalformedMessageError
from migsec.protocol.messages import MigrationRequest
from migsec.protocol.plan import DiskPlan, MigrationPlan

UUID = "0b1c6e4a-6f8e-4b59-9d43-5b3e2d0b7a11"


@pytest.fixture
def info():
    with virt.connect("test:///default") as conn:
        return virt.describe_domain(conn, "test")  # the test driver's running guest


@pytest.mark.parametrize("mode", ["cold", "live"])
def test_the_plan_carries_what_libvirt_describes(info, mode):
    bare = MigrationRequest(vm=info.name, mode=mode, dest_did="cloud-b.example", storage_map={"/a": "/b"})
    plan = plan_for(bare, info)
    request = MigrationRequest(vm=bare.vm, mode=mode, dest_did=bare.dest_did, storage_map=bare.storage_map,
                               plan=plan)
    assert (plan.vm_uuid, plan.vcpus, plan.memory_bytes, plan.mode) == (info.uuid, info.vcpus, info.memory_bytes, mode)
    assert plan.paused is (info.state.value == "paused")
    assert request_files(request) == list(dict.fromkeys(f for d in info.disks for f in d.files))
    assert [d.target for d in plan.disks] == [d.target for d in info.disks]
    assert plan.disk_bytes == sum(d.virtual_size or 0 for d in info.disks)
    assert vm_attributes(plan)["vm-uuid"] == info.uuid and dict(plan.storage_map) == {"/a": "/b"}


def test_a_request_without_a_plan_has_no_files_to_move():
    with pytest.raises(MalformedMessageError, match="carries no migration plan"):
        request_files(MigrationRequest(vm="vm1", mode="cold", dest_did="cloud-b.example"))


def test_undefinesource_removes_the_plans_top_images_even_with_a_pipe_in_the_name(tmp_path):
    from migsec.migration.journal import Journal
    from migsec.migration.release import remove_moved_disks

    top, base, bystander = tmp_path / "vm|1,a.qcow2", tmp_path / "base.qcow2", tmp_path / "vm"
    for f in (top, base, bystander):
        f.write_bytes(b"x")
    plan = MigrationPlan(vm_name="vm1", vm_uuid=UUID, mode="cold", vcpus=1, memory_bytes=1 << 20,
                         disks=(DiskPlan("vda", "file", str(top), "qcow2", 1 << 20, (str(base),)),))
    journal = Journal(tmp_path / "state")
    journal.create("m1", "source", {"domain": "vm1", "plan": plan.to_dict()})
    recorded = journal.get("m1").plan()
    assert recorded == plan
    # the old string options split the name at "|": the plan removes exactly the top image
    assert remove_moved_disks(recorded) == []
    assert not top.exists() and base.exists() and bystander.exists()


def test_a_journal_entry_without_a_plan_is_named_not_guessed(tmp_path):
    from migsec.migration.journal import Journal

    journal = Journal(tmp_path / "state")
    journal.create("m2", "destination", {"domain": "vm1", "options": {"vm_uuid": UUID, "files": "/a"}})
    with pytest.raises(JournalError, match="m2: its journal entry records no migration plan"):
        journal.get("m2").plan()
    bad = MigrationPlan(vm_name="vm1", vm_uuid=UUID, mode="cold", vcpus=1, memory_bytes=1).to_dict()
    bad["vcpus"] = 0
    journal.create("m3", "destination", {"domain": "vm1", "plan": bad})
    with pytest.raises(MalformedMessageError, match="vcpus"):
        journal.get("m3").plan()

"""The AZ's typed plan says what the string options said, for a real libvirt domain description."""
from __future__ import annotations

import pytest

from migsec import virt
from migsec.migration.dataplane import enrich_options, plan_for, request_files, request_files_of
from migsec.migration.link import vm_facts
from migsec.migration.live import live_disks, live_options, request_live_disks
from migsec.protocol.messages import MigrationRequest


@pytest.fixture
def info():
    with virt.connect("test:///default") as conn:
        return virt.describe_domain(conn, "test")  # the test driver's running guest


@pytest.mark.parametrize("mode", ["cold", "live"])
def test_plan_and_string_options_agree(info, mode):
    bare = MigrationRequest(vm=info.name, mode=mode, dest_did="cloud-b.example", storage_map={"/a": "/b"})
    options = enrich_options({}, info)
    if mode == "live":
        options = live_options(options, info)
    with_plan = MigrationRequest(vm=bare.vm, mode=mode, dest_did=bare.dest_did, storage_map=bare.storage_map,
                                 options=options, plan=plan_for(bare, info))
    strings_only = MigrationRequest(vm=bare.vm, mode=mode, dest_did=bare.dest_did,
                                    storage_map=bare.storage_map, options=options)
    assert with_plan.plan is not None
    assert request_files(with_plan) == request_files_of(options) == list(info.files)
    assert request_files(strings_only) == request_files(with_plan)
    assert vm_facts(with_plan) == vm_facts(strings_only)
    assert request_live_disks(with_plan) == live_disks(live_options({}, info))
    assert with_plan.plan.top_files == tuple(request_files_of(options, "top_files"))
    assert with_plan.plan.paused == options["paused"]
    assert with_plan.plan.memory_bytes == options["memory_bytes"]


def test_undefinesource_removes_the_plans_top_images_even_with_a_pipe_in_the_name(tmp_path):
    from migsec.migration.journal import Journal
    from migsec.migration.release import journal_plan, remove_moved_disks
    from migsec.protocol.plan import DiskPlan, MigrationPlan

    top, base, bystander = tmp_path / "vm|1.qcow2", tmp_path / "base.qcow2", tmp_path / "vm"
    for f in (top, base, bystander):
        f.write_bytes(b"x")
    plan = MigrationPlan(vm_name="vm1", vm_uuid="0b1c6e4a-6f8e-4b59-9d43-5b3e2d0b7a11", mode="cold", vcpus=1,
                         memory_bytes=1 << 20, disks=(DiskPlan("vda", "file", str(top), "qcow2", 1 << 20, (str(base),)),))
    journal = Journal(tmp_path / "state")
    journal.create("m1", "source", {"domain": "vm1", "plan": plan.to_dict()})
    recorded = journal_plan(journal.get("m1"))
    assert recorded == plan
    # the string options would split the name at "|": the plan removes exactly the top image
    assert remove_moved_disks({"top_files": str(top)}, recorded) == []
    assert not top.exists() and base.exists() and bystander.exists()
    journal.create("m2", "source", {"domain": "vm1"})
    assert journal_plan(journal.get("m2")) is None

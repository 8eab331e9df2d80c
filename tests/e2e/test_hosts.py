"""End-to-end: what real hypervisor hosts look like (issue 11).

- B's image directory on another file system than its staging directory (the normal layout:
  ``/var/lib/migsec`` vs ``/var/lib/libvirt/images`` on another mount): a tmpfs is mounted on
  B's image directory inside B's mount namespace, so migsecd, libvirtd and QEMU at B all see it;
- migsecd finishes at start what a crash interrupted (``[recovery] auto``), without
  ``migsec recover``.
"""
from __future__ import annotations

import contextlib
import json
import signal
import time

import pytest

from migsec.lab import Lab
from tests.e2e.conftest import migrate
from tests.e2e.test_migration import (
    assert_counter_continues,
    assert_state_intact,
    audit_ok,
    journal,
    migrate_in_background,
    wait_for,
)

pytestmark = pytest.mark.lab


def device_inside(lab: Lab, host: str, path) -> int:
    """``st_dev`` of ``path`` as processes inside ``host`` (migsecd, QEMU) see it."""
    return int(lab.host(host).exec(["stat", "-c", "%d", str(path)]).stdout.strip())


@contextlib.contextmanager
def image_dir_on_tmpfs(dep, host: str, size: str = "512m"):
    """A tmpfs mounted on ``host``'s image directory inside its mount namespace, for the block."""
    lab = dep.lab
    h = lab.host(host)
    h.exec(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0711", f"migsec-{host}-images", str(h.image_dir)])
    try:
        yield h.image_dir
    finally:
        for _ in range(50):
            if h.exec(["umount", str(h.image_dir)], check=False).returncode == 0:
                break
            time.sleep(0.2)  # QEMU may still be closing the disk
        else:
            raise AssertionError(f"cannot unmount the tmpfs on {h.image_dir} in host {host}")


def test_images_on_another_filesystem_than_staging(dep, guest):
    a, b = dep["a"], dep["b"]
    lab = dep.lab
    with image_dir_on_tmpfs(dep, "b") as images:
        # the test is only worth something if the two really are different file systems
        assert device_inside(lab, "b", b.staging) != device_inside(lab, "b", images)
        try:
            code, result, err = migrate(dep, guest.name, "--undefinesource", "--persistent")
            assert code == 0, (result, err)
            guest.wait_counter_beyond("b", 0)  # virtlogd may not have written B's console yet
            guest.assert_runs_only_on("b")
            last_on_a = guest.console("a").counters[-1]
            assert_state_intact(guest, "b", last_on_a)
            assert_counter_continues(guest.console("b").counters[0], last_on_a)
            # the disk is on B's tmpfs, nothing is left half-staged beside it or in staging
            listing = b.lab.host("b").exec(["ls", "-A", str(images)]).stdout.split()
            assert listing == [f"{guest.name}.qcow2"], listing
            assert not list(b.staging.glob("in-*"))
            mid = result["migration_id"]
            assert journal(a, mid)["phase"] == "done" and journal(b, mid)["phase"] == "done"
        finally:
            lab.host("b").virsh("destroy", guest.name, check=False)
            lab.host("b").virsh("undefine", guest.name, check=False)
    for d in (a, b):
        audit_ok(d)


def test_undefinesource_reports_a_source_disk_it_could_not_remove(dep, guest):
    """A's disk is a mount point inside A (a bind mount of itself): unlink() fails with EBUSY
    after the commit. The migration still succeeds, and says which disk is left."""
    a = dep["a"]
    lab = dep.lab
    disk = lab.host("a").image_dir / f"{guest.name}.qcow2"
    lab.host("a").exec(["mount", "--bind", str(disk), str(disk)])
    try:
        code, result, err = migrate(dep, guest.name, "--undefinesource", "--persistent")
        assert code == 0, (result, err)
        guest.wait_counter_beyond("b", 0)
        guest.assert_runs_only_on("b")
        assert guest.state("a") == "absent"
        (left,) = result["disks_not_removed"]
        assert left["path"] == str(disk) and "busy" in left["error"].lower(), left
        row = journal(a, result["migration_id"])
        assert row["phase"] == "done" and row["disks_not_removed"] == [left]
        table = a.migsec("jobs", "--config", str(a.config), check=True).stdout
        assert f"source disk {disk} was not removed" in table, table
    finally:
        lab.host("a").exec(["umount", str(disk)], check=False)
    assert disk.exists()  # it really is still there
    disk.unlink()


def test_migsecd_recovers_by_itself_after_a_crash(dep, guest):
    """A's migsecd dies once B holds the restored guest; it is only started again, nobody runs
    `migsec recover`: [recovery] auto (the default) leaves exactly one copy running."""
    from migsec.audit import Ledger

    a, b = dep["a"], dep["b"]
    last = guest.console("a").counters[-1]
    proc = migrate_in_background(dep, guest.name)
    try:
        wait_for(lambda: guest.state("b") in ("paused", "running"), 120, "the guest restored on B")
        a.kill(signal.SIGKILL)
        proc.wait(timeout=60)
        # what the crash left, read before A's migsecd starts again (its automatic recovery may
        # finish before start() returns): the guest does not run at A
        crashed_at_a = guest.state("a")
    finally:
        a.start()
    assert crashed_at_a != "running", crashed_at_a

    def settled():
        running = [h for h in ("a", "b") if guest.state(h) == "running"]
        unfinished = [r for d in (a, b) for r in json.loads(d.migsec("jobs", "--json", "--config",
                                                                      str(d.config), check=True).stdout)
                      if r["domain"] == guest.name and r["phase"] not in ("done", "rolled-back", "discarded")]
        return running if len(running) == 1 and not unfinished else None

    (host,) = wait_for(settled, 120, "migsecd's automatic recovery")
    guest.assert_runs_only_on(host)
    assert_state_intact(guest, host, last)
    recovered = [e for e in Ledger(a.base / "state" / "ledger.jsonl").entries() if e.kind == "recovered"]
    assert recovered and recovered[-1].body["automatic"] is True, [dict(e.body) for e in recovered]
    assert recovered[-1].body["domain"] == guest.name
    assert "automatic recovery of" in a.log.read_text()
    for d in (a, b):
        audit_ok(d)

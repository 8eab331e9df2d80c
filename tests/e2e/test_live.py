"""End-to-end live migration (``migsec migrate --live``) between the lab's two real migsecds.

libvirt moves a running QEMU guest peer to peer; its RPC, QEMU's migration stream and
the NBD disk mirror cross migsec's keyed session as byte channels, through B's filtering
libvirt RPC proxy. Each test checks what the guest says on its console (counter, memory
checksum, disk blocks), what libvirt says on both hosts, the journals and both ledgers.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.e2e.conftest import migrate
from tests.e2e.deploy import ADMIN, ADMIN_PASSWORD, MIGSEC, PORT
from tests.e2e.test_migration import (
    assert_counter_continues,
    assert_state_intact,
    audit_ok,
    journal,
    ledger_entries,
    wait_for,
)

pytestmark = pytest.mark.lab


def migrate_from(dep, host: str, name: str, *extra: str, timeout: float = 300):
    """``migsec migrate NAME migsec://<other host> --json`` run on ``host``."""
    src, dst = dep[host], dep["b" if host == "a" else "a"]
    proc = src.migsec("migrate", name, f"migsec://{dst.address}:{PORT}", "--json", "--user", ADMIN,
                      "--password-stdin", "--config", str(src.config), *extra, input=ADMIN_PASSWORD + "\n",
                      timeout=timeout)
    result = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, result, proc.stderr


def run_dirs(dep, host: str) -> list[str]:
    """What is left in /run/migsec/ of ``host`` besides the daemon's own socket."""
    proc = dep.lab.host(host).exec(["ls", "-A", "/run/migsec"], check=False)
    return [n for n in proc.stdout.split() if not n.endswith(".sock") and n != "permits"]


def images(dep, host: str, name: str) -> list[str]:
    return sorted(p.name for p in dep.lab.host(host).image_dir.glob(f"{name}*.qcow2"))


def assert_clean_failure(dep, guest, before: int) -> None:
    """The guest runs on at A (same boot, counter going on), nothing of it is left at B."""
    guest.assert_runs_only_on("a")
    assert guest.wait_counter_beyond("a", before) > before
    assert not guest.console("a").boots[1:], "the guest rebooted at A"
    wait_for(lambda: guest.state("b") == "absent", 60, "B to drop the incoming domain")
    wait_for(lambda: not images(dep, "b", guest.name), 60, "B to remove its pre-created disk")
    assert not run_dirs(dep, "a") and not run_dirs(dep, "b")


def test_live_move_there_and_back(dep, guest):
    a, b = dep["a"], dep["b"]
    boots = len(guest.console("a").boots)
    code, result, err = migrate_from(dep, "a", guest.name, "--live", "--persistent", "--undefinesource")
    assert code == 0, (err, result)
    assert result["mode"] == "live" and result["destination_did"] == b.did
    job = result["job"]
    assert job["downtime_ms"] > 0 and job["memory_processed"] > 0
    # gone from A (undefined, its disk removed), running at B as the same boot
    assert guest.state("a") == "absent"
    assert not images(dep, "a", guest.name)
    assert guest.state("b") == "running"
    assert "yes" in b.lab.host("b").virsh("dominfo", guest.name).split("Persistent:")[1].splitlines()[0]
    last_on_a = guest.console("a").counters[-1]
    assert not guest.console("b").boots, "the guest rebooted at B"
    assert_counter_continues(guest.console("b").counters[0], last_on_a)
    assert_state_intact(guest, "b", last_on_a)
    # only allocated data crossed: wire bytes within 5% of memory sent + what the disk holds
    channels = result["channels"]
    assert sum(v for k, v in channels.items() if k.startswith("qemu.")) > 0
    assert sum(v for k, v in channels.items() if k.startswith("nbd.")) > 0
    # both journals at done, both ledgers verify; receipts carry every channel's digests
    mid = result["migration_id"]
    assert journal(a, mid)["phase"] == "done" and journal(b, mid)["phase"] == "done"
    for d in (a, b):
        audit_ok(d)
    receipt = ledger_entries(a, mid, "receipt")
    assert receipt and receipt[0]["peer"]["did"] == b.did
    assert not run_dirs(dep, "a") and not run_dirs(dep, "b")

    # and back from B to A: the counter goes on again, still no reboot
    last_on_b = guest.console("b").counters[-1]
    code, back, err = migrate_from(dep, "b", guest.name, "--live", "--persistent", "--undefinesource")
    assert code == 0, (err, result)
    assert guest.state("b") == "absent" and guest.state("a") == "running"
    assert not images(dep, "b", guest.name)
    assert len(guest.console("a").boots) == boots, "the guest rebooted on its way back"
    assert_state_intact(guest, "a", last_on_b)
    for d in (a, b):
        audit_ok(d)

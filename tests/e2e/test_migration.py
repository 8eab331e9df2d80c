"""End-to-end: real migsecd daemons in the two-host lab move real QEMU guests.

Each test boots its own small guest on host a and checks what the guest itself says
on its serial console (counter, memory checksum, disk blocks), what libvirt says on
both hosts, and the audit ledgers.
"""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from migsec.lab import expected_memory_sha256
from tests.e2e.conftest import GUEST_REGION_MIB, migrate, recovery_outcomes
from tests.e2e.deploy import ADMIN, ADMIN_PASSWORD, GUEST, GUEST_PASSWORD, MIGSEC, PORT, run

pytestmark = pytest.mark.lab


def audit_ok(domain) -> str:
    proc = domain.migsec("audit", "--config", str(domain.config), "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def ledger_entries(domain, migration_id: str, kind: str) -> list[dict]:
    proc = domain.migsec("audit", "--config", str(domain.config), "show", "--migration", migration_id,
                         "--json", check=True)
    return [e for e in map(json.loads, proc.stdout.splitlines()) if e["kind"] == kind]


def journal(domain, migration_id: str) -> dict:
    proc = domain.migsec("jobs", "--json", "--config", str(domain.config), check=True)
    rows = {r["migration_id"]: r for r in json.loads(proc.stdout)}
    return rows.get(migration_id, {})


def staged_parts(domain) -> list[Path]:
    """Part files of incoming migrations: the memory image in staging, disks beside their targets."""
    images = domain.lab.host(domain.host).image_dir
    return list(domain.staging.glob("in-*/*.part")) + list(images.glob(".migsec-in-*.part"))


def leftovers(domain, name: str) -> list[str]:
    """Files of an incoming migration of ``name`` left on ``domain``'s host."""
    found = [str(p) for p in domain.staging.glob("in-*")]
    found += [str(p) for p in domain.lab.host(domain.host).image_dir.glob(f"{name}*")]
    found += [str(p) for p in staged_parts(domain)]
    return found


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def assert_counter_continues(first_at_b: int, last_at_a: int) -> None:
    """B's first counter follows A's last one (virtlogd may not have flushed A's last lines yet:
    allow a few seconds' worth); a rebooted guest would start again from 1."""
    assert last_at_a - 1 <= first_at_b <= last_at_a + 25, (first_at_b, last_at_a)


def assert_state_intact(guest, host: str, counter_before: int) -> None:
    """The guest on ``host`` is the same boot, its counter went on, memory and disk check out."""
    counter = guest.wait_counter_beyond(host, counter_before, timeout=30)
    assert counter > counter_before
    dep = guest.dep
    # a new MEM line, after the move, with the pattern's checksum (the guest checks every 5 s)
    seen = len(guest.console(host).memory)
    mem = wait_for(lambda: guest.console(host).memory[seen:], 30, "a memory check after the move")[0]
    assert mem.ok and mem.sha256 == expected_memory_sha256(guest.seed, GUEST_REGION_MIB)
    dep.lab.request_disk_check(host, guest.name)
    check = wait_for(lambda: guest.console(host).disk_checks, 30, "the guest's disk check")[-1]
    assert check.blocks > 0 and check.bad == 0


def migrate_in_background(dep, name: str, *extra: str) -> subprocess.Popen:
    """``migsec migrate NAME migsec://B --json`` started on host a as admin (password sent)."""
    a, b = dep["a"], dep["b"]
    proc = a.lab.host("a").popen(
        [MIGSEC, "migrate", name, f"migsec://{b.address}:{PORT}", "--json", "--user", ADMIN,
         "--password-stdin", *extra, "--config", str(a.config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(ADMIN_PASSWORD + "\n")
    proc.stdin.close()
    return proc


def test_success_guest_continues_on_b(dep, guest):
    a, b = dep["a"], dep["b"]
    boot = guest.console("a").boots[-1]
    code, result, err = migrate(dep, guest.name, "--undefinesource", "--persistent")
    assert code == 0, err
    assert result["ok"] and result["destination_did"] == b.did and result["bytes_on_wire"] > 0
    # gone from A (undefined, its disk removed), running on B as the same boot whose counter continues
    assert guest.state("a") == "absent"
    assert not list(dep.lab.host("a").image_dir.glob(f"{guest.name}.qcow2"))
    assert guest.state("b") == "running"
    assert "yes" in dep.lab.host("b").virsh("dominfo", guest.name).split("Persistent:")[1].splitlines()[0]
    last_on_a = guest.console("a").counters[-1]
    on_b = guest.console("b")
    assert not on_b.boots, "the guest rebooted on B"
    assert_state_intact(guest, "b", last_on_a)
    assert_counter_continues(guest.console("b").counters[0], last_on_a)
    assert boot == guest.console("a").boots[-1]
    # both sides journalled the end, and both ledgers verify, each holding the peer's signatures
    mid = result["migration_id"]
    assert journal(a, mid)["phase"] == "done" and journal(b, mid)["phase"] == "done"
    for d in (a, b):
        out = audit_ok(d)
        assert "peer-signed" in out
    # A's ledger holds its own signed MigReq body, the same JWS B ledgered as A's
    req_a, req_b = (ledger_entries(d, mid, "mig-req") for d in (a, b))
    assert len(req_a) == len(req_b) == 1 and req_a[0]["peer"] is None
    assert req_a[0]["body"]["role"] == "source" and req_a[0]["body"]["token"] == req_b[0]["peer"]["token"]
    assert not list(b.staging.glob("in-*"))


def test_denied_at_source_by_policy_then_timeout(dep, guest):
    before = guest.console("a").counters[-1]
    code, result, err = migrate(dep, guest.name, user=GUEST, password=GUEST_PASSWORD)
    assert code == 3, (result, err)
    assert "policy" in result["message"] and result.get("where") == "source"
    guest.assert_runs_only_on("a")
    assert guest.console("a").counters[-1] > before
    assert not leftovers(dep["b"], guest.name)
    # --timeout: a transfer slowed to 4 MiB/s cannot finish in 4 s; it is stopped and rolled back
    code, result, err = migrate(dep, guest.name, "--bandwidth", "4", "--timeout", "4")
    assert code == 4 and result["rolled_back"] is True and "--timeout" in result["message"], (result, err)
    guest.assert_runs_only_on("a")
    wait_for(lambda: not leftovers(dep["b"], guest.name), 30, "B to discard the partial files")


def test_denied_at_destination_by_policy(dep, guest):
    b = dep["b"]
    b.write_policies(accept_from=["cloud-z.example"])
    b.reload()
    try:
        code, result, err = migrate(dep, guest.name)
    finally:
        b.write_policies()
        b.reload()
    assert code == 3, (result, err)
    assert "cloud-b.example refused" in result["message"] and "policy" in result["message"]
    guest.assert_runs_only_on("a")
    assert not leftovers(b, guest.name)


def test_wrong_password_then_dry_run(dep, guest):
    code, result, err = migrate(dep, guest.name, password="not the password")
    assert code == 3, (result, err)
    assert "wrong password" in (result.get("message", "") + err)
    guest.assert_runs_only_on("a")
    # --dry-run: authenticated, authorized by both domains, capacity checked, nothing moved
    code, result, err = migrate(dep, guest.name, "--dry-run")
    assert code == 0, (result, err)
    assert result["dry_run"] is True and result["destination_did"] == dep["b"].did
    guest.assert_runs_only_on("a")
    assert not leftovers(dep["b"], guest.name)


def test_unknown_peer_certificate(dep, guest, tmp_path):
    """A's peer directory holds a certificate for cloud-b.example from a CA that A does not trust."""
    a, b = dep["a"], dep["b"]
    run([MIGSEC, "ca", "init", str(tmp_path / "rogue-ca"), "--name", "rogue CA"])
    run([MIGSEC, "ca", "issue", "--did", b.did, "--out", str(tmp_path / "rogue"), "--ca", str(tmp_path / "rogue-ca")])
    cfg = str(a.config)
    run([MIGSEC, "peer", "del", b.did, "--config", cfg])
    run([MIGSEC, "peer", "add", b.did, "--address", f"{b.address}:{PORT}",
         "--cert", str(tmp_path / "rogue" / "domain-cert.pem"), "--config", cfg])
    try:
        code, result, err = migrate(dep, guest.name)
    finally:
        run([MIGSEC, "peer", "del", b.did, "--config", cfg])
        run([MIGSEC, "peer", "add", b.did, "--address", f"{b.address}:{PORT}",
             "--cert", str(b.base / "pki" / "domain-cert.pem"), "--config", cfg])
    assert code != 0, result
    assert "UnknownIssuer" in result.get("error", "") or "trusted" in result.get("message", ""), result
    guest.assert_runs_only_on("a")
    assert not leftovers(b, guest.name)


@contextlib.contextmanager
def peer_through_cutting_relay(dep, cut_after: int = 24 * 1024 * 1024):
    """A reaches B through a relay inside A (tests/e2e/relay.py) that resets the connection
    after ``cut_after`` bytes; the peer entry is restored on exit, when the yielded object's
    ``events`` gets what the relay printed."""
    a, b = dep["a"], dep["b"]
    relay_port = PORT + 1
    relay = dep.lab.host("a").popen(
        [sys.executable, str(Path(__file__).with_name("relay.py")), f"{a.address}:{relay_port}",
         f"{b.address}:{PORT}", str(cut_after)], stdout=subprocess.PIPE, text=True)
    cfg, cert = str(a.config), str(b.base / "pki" / "domain-cert.pem")
    seen = SimpleNamespace(events="")
    try:
        assert relay.stdout.readline().strip() == "listening"
        run([MIGSEC, "peer", "del", b.did, "--config", cfg])
        run([MIGSEC, "peer", "add", b.did, "--address", f"{a.address}:{relay_port}", "--cert", cert, "--config", cfg])
        yield seen
    finally:
        run([MIGSEC, "peer", "del", b.did, "--config", cfg])
        run([MIGSEC, "peer", "add", b.did, "--address", f"{b.address}:{PORT}", "--cert", cert, "--config", cfg])
        relay.kill()
        seen.events = relay.stdout.read()
        relay.wait()


def test_connection_cut_mid_transfer_resumes(dep, guest):
    """A relay on A's side resets the connection after 24 MiB; the transfer resumes and completes."""
    a, b = dep["a"], dep["b"]
    with peer_through_cutting_relay(dep) as relay:
        code, result, err = migrate(dep, guest.name, "--undefinesource",
                                    destination=f"migsec://{b.did}:{PORT}")
    assert "cut" in relay.events, "the relay never cut the connection (transfer smaller than the cut?)"
    assert relay.events.count("connection") >= 1
    assert code == 0, (result, err)
    guest.assert_runs_only_on("b")
    assert_state_intact(guest, "b", guest.console("a").counters[-1])
    assert_counter_continues(guest.console("b").counters[0], guest.console("a").counters[-1])
    for d in (a, b):
        audit_ok(d)


def test_destination_daemon_killed_mid_transfer(dep, guest):
    """B's migsecd dies mid-transfer: A rolls back (the guest runs on A), B keeps no partial files."""
    a, b = dep["a"], dep["b"]
    earlier = set(staged_parts(b))  # (none, unless an earlier test left some: not this migration's)
    proc = migrate_in_background(dep, guest.name, "--bandwidth", "10")
    try:
        wait_for(lambda: any(p.stat().st_blocks * 512 > 4 * 1024 * 1024 for p in set(staged_parts(b)) - earlier),
                 60, "data arriving at B")
        b.kill(signal.SIGKILL)
        proc.wait(timeout=120)
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        b.start()
    assert proc.returncode == 4, (out, err)
    assert json.loads(out)["rolled_back"] is True
    guest.assert_runs_only_on("a")
    # B's daemon restarts with partial files; recovery asks A, learns "abort", removes them
    # (migsecd's automatic recovery at start or this `migsec recover`, whichever runs first)
    rec = b.migsec("recover", "--json", "--config", str(b.config))
    assert rec.returncode == 0, rec.stderr
    outcomes = recovery_outcomes(b, rec)
    assert any("aborted" in outcome for outcome in outcomes), outcomes
    assert not leftovers(b, guest.name)
    guest.assert_runs_only_on("a")
    for d in (a, b):
        audit_ok(d)


def test_source_daemon_killed_after_restore_then_recover(dep, guest):
    """A's migsecd dies once B holds the restored guest; `migsec recover` leaves exactly one copy running."""
    a, b = dep["a"], dep["b"]
    last = guest.console("a").counters[-1]
    proc = migrate_in_background(dep, guest.name)
    try:
        wait_for(lambda: guest.state("b") in ("paused", "running"), 120, "the guest restored on B")
        a.kill(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        a.start()
    rec = a.migsec("recover", "--json", "--config", str(a.config))
    assert rec.returncode == 0, rec.stderr
    running = [h for h in ("a", "b") if guest.state(h) == "running"]
    assert len(running) == 1, {h: guest.state(h) for h in ("a", "b")}
    host = running[0]
    guest.assert_runs_only_on(host)
    if host == "a":
        assert guest.state("b") == "absent" and not leftovers(b, guest.name)
    assert not guest.console(host).boots or host == "a"
    assert_state_intact(guest, host, last)
    for d in (a, b):
        audit_ok(d)


def test_source_daemon_killed_after_commit_then_recover(dep, guest):
    """A decides commit and dies before B confirms (B is held at commit-received): after
    `migsec recover` at A the guest runs on B only, both journals are done, both ledgers verify."""
    a, b = dep["a"], dep["b"]
    last = guest.console("a").counters[-1]
    journal_dir = b.base / "state" / "journal"
    known = set(journal_dir.glob("*.json"))
    proc = migrate_in_background(dep, guest.name)

    def b_decided():
        for path in set(journal_dir.glob("*.json")) - known:
            try:
                entry = json.loads(path.read_text())
            except ValueError:
                return None  # being replaced
            if entry["phase"] in ("commit-received", "resumed", "done"):
                return entry
        return None

    stopped = False
    try:
        entry = wait_for(b_decided, 120, "B to receive the commit decision")
        b.process.send_signal(signal.SIGSTOP)  # B holds: A waits for B's Resumed
        stopped = True
        a.kill(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if stopped:
            b.process.send_signal(signal.SIGCONT)
        a.start()
    mid = entry["migration_id"]
    rec = a.migsec("recover", "--json", "--config", str(a.config))
    assert rec.returncode == 0, rec.stderr
    wait_for(lambda: journal(a, mid).get("phase") == "done" or
             a.migsec("recover", "--config", str(a.config)).returncode != 0, 60, "A's journal to finish")
    assert journal(a, mid)["phase"] == "done" and journal(b, mid)["phase"] == "done"
    guest.assert_runs_only_on("b")
    assert_state_intact(guest, "b", last)
    for d in (a, b):
        audit_ok(d)

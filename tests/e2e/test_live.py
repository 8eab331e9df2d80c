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

from tests.e2e.conftest import migrate, recovery_outcomes
from tests.e2e.deploy import ADMIN, ADMIN_PASSWORD, MIGSEC, PORT
from tests.e2e.test_migration import (
    assert_counter_continues,
    assert_state_intact,
    audit_ok,
    journal,
    ledger_entries,
    migrate_in_background,
    peer_through_cutting_relay,
    wait_for,
)

pytestmark = pytest.mark.lab


def migrate_from(dep, host: str, name: str, *extra: str, timeout: float = 300, destination: str | None = None):
    """``migsec migrate NAME migsec://<other host> --json`` run on ``host``."""
    src, dst = dep[host], dep["b" if host == "a" else "a"]
    proc = src.migsec("migrate", name, destination or f"migsec://{dst.address}:{PORT}", "--json", "--user", ADMIN,
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
    # A committed on its source QEMU's exit (after B's Finish3 reply), not after libvirt's Confirm
    assert result["commit_signal"] == "qemu-exit", result
    job = result["job"]
    assert job["downtime_ms"] > 0 and job["memory_processed"] > 0
    # the pause the guest saw: libvirt's downtime (up to B's Finish) + B's wait for A's signed commit
    assert result["libvirt_downtime_ms"] == job["downtime_ms"] and result["paused_wait_ms"] > 0
    assert result["downtime_seconds"] * 1000 == pytest.approx(result["libvirt_downtime_ms"]
                                                              + result["paused_wait_ms"], abs=1)
    # gone from A (undefined, its disk removed), running at B as the same boot
    assert guest.state("a") == "absent"
    assert not images(dep, "a", guest.name)
    assert guest.state("b") == "running"
    assert "yes" in b.lab.host("b").virsh("dominfo", guest.name).split("Persistent:")[1].splitlines()[0]
    last_on_a = guest.console("a").counters[-1]
    wait_for(lambda: guest.console("b").counters, 30, "the guest counting at B")  # B resumed it just now
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


def wire_budget(result: dict, allocated_disk: int) -> None:
    """Only allocated data crossed: wire bytes <= 1.05 x (memory sent + allocated disk)."""
    memory = result["job"]["memory_processed"]
    assert result["bytes_on_wire"] <= 1.05 * (memory + allocated_disk), (result["bytes_on_wire"], memory,
                                                                          allocated_disk)


def allocated(dep, host: str, name: str) -> int:
    return sum(p.stat().st_blocks * 512 for p in dep.lab.host(host).image_dir.glob(f"{name}*.qcow2"))


def test_live_bandwidth_is_honoured_and_wire_bytes_stay_small(dep, guest):
    disk = allocated(dep, "a", guest.name)
    code, result, err = migrate_from(dep, "a", guest.name, "--live", "--bandwidth", "20")
    assert code == 0, (err, result)
    job = result["job"]
    assert job["memory_bps"] <= 20 * 1024 * 1024 * 1.15, job
    wire_budget(result, disk)
    guest.assert_runs_only_on("b")
    # no --persistent / --undefinesource: B runs it transient, A keeps its shut-off definition
    assert guest.state("a") in ("shut off", "absent")


@pytest.fixture
def rogue_source(dep, request):
    """A's migsecd restarted as a dishonest source (tests/e2e/rogue/sitecustomize.py)."""
    from pathlib import Path

    from tests.e2e.deploy import MIGSECD

    a = dep["a"]
    a.stop()
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).with_name("rogue")),
           "MIGSEC_TEST_ROGUE": request.param}
    a.log_handle = open(a.log, "ab")
    a.process = a.lab.host("a").popen([MIGSECD, "--config", str(a.config)], stdin=subprocess.DEVNULL,
                                      stdout=a.log_handle, stderr=subprocess.STDOUT, env=env)
    wait_for(lambda: a.socket.exists() and a.migsec("jobs", "--config", str(a.config)).returncode == 0, 30,
             "the rogue source's migsecd")
    try:
        yield request.param
    finally:
        a.stop()
        a.start()


@pytest.mark.parametrize("rogue_source", ["tcp-uri", "rename"], indirect=True)
def test_live_refused_rpc_leaves_the_guest_at_a(dep, guest, rogue_source):
    a, b = dep["a"], dep["b"]
    before = guest.console("a").counters[-1]
    code, result, err = migrate_from(dep, "a", guest.name, "--live", "--persistent", "--undefinesource")
    assert code == 4, (err, result)
    assert result["rolled_back"] is True
    assert_clean_failure(dep, guest, before)
    refused = ledger_entries(b, result.get("migration_id") or _last_migration(b), "rpc-refused")
    assert refused, "B did not audit the refused RPC"
    assert all(e["body"]["reason"] for e in refused)
    for d in (a, b):
        audit_ok(d)


def _last_migration(domain) -> str:
    proc = domain.migsec("jobs", "--json", "--config", str(domain.config), check=True)
    rows = sorted(json.loads(proc.stdout), key=lambda r: r.get("updated", ""))
    return rows[-1]["migration_id"]


def test_live_move_keeping_the_source_definition_marks_it_given_away(dep, guest):
    """Without --undefinesource libvirt leaves A's definition shut off: A marks it given away
    (as after a cold move), so the hook refuses to start it until `migsec release`."""
    a, b = dep["a"], dep["b"]
    code, result, err = migrate_from(dep, "a", guest.name, "--live", "--persistent")
    assert code == 0, (err, result)
    assert guest.state("a") == "shut off" and guest.state("b") == "running"
    assert result.get("marked") is True or journal(a, result["migration_id"]).get("marked"), result
    inactive = a.lab.host("a").virsh("dumpxml", "--inactive", guest.name)
    assert "https://migsec.example/xmlns/1/moved" in inactive and result["migration_id"] in inactive
    assert ledger_entries(a, result["migration_id"], "given-away")
    released = a.migsec("release", guest.name, "--config", str(a.config))
    assert released.returncode == 0, released.stderr
    assert "xmlns/1/moved" not in a.lab.host("a").virsh("dumpxml", "--inactive", guest.name)
    for d in (a, b):
        audit_ok(d)


def interrupt_live_move(dep, guest, act, *, after=None) -> tuple[int, str, str]:
    """A slow (10 MiB/s) live move of the guest, ``act(proc)`` once B prepared the incoming
    guest; returns (exit code, stdout, stderr) of ``migsec migrate``. ``after()`` runs in any
    case (e.g. restarting a daemon ``act`` killed)."""
    proc = migrate_in_background(dep, guest.name, "--live", "--bandwidth", "10", "--persistent", "--undefinesource")
    try:
        wait_for(lambda: guest.state("b") == "paused", 120, "the incoming guest prepared at B")
        act(proc)
        proc.wait(timeout=180)
        return proc.returncode, proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        if after is not None:
            after()


def test_live_connection_cut_mid_migration_rolls_back(dep, guest):
    """A relay resets the session after 24 MiB of QEMU's stream: libvirt rolls back, the guest stays at A."""
    a, b = dep["a"], dep["b"]
    before = guest.console("a").counters[-1]
    with peer_through_cutting_relay(dep) as relay:
        code, result, err = migrate_from(dep, "a", guest.name, "--live", "--bandwidth", "30",
                                         "--persistent", "--undefinesource",
                                         destination=f"migsec://{b.did}:{PORT}")
    assert "cut" in relay.events
    assert code == 4, (err, result)
    assert result["rolled_back"] is True
    assert_clean_failure(dep, guest, before)
    for d in (a, b):
        audit_ok(d)


def test_live_jobs_abort_rolls_back_and_ctrl_c_aborts_too(dep, guest):
    """`migsec jobs abort` of a running live move aborts libvirt's job: the guest never left A."""
    a, b = dep["a"], dep["b"]
    before = guest.console("a").counters[-1]
    seen = {}

    def abort(proc):
        rows = json.loads(a.migsec("jobs", "--json", "--config", str(a.config)).stdout)
        seen["mid"] = mid = next(r["migration_id"] for r in rows if r.get("running"))
        seen["aborted"] = a.migsec("jobs", "abort", mid, "--config", str(a.config), timeout=180)

    code, out, err = interrupt_live_move(dep, guest, abort)
    mid, aborted = seen["mid"], seen["aborted"]
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    assert f"aborted migration {mid}" in aborted.stdout, aborted.stdout
    assert code == 4, (out, err)
    result = json.loads(out)
    assert result["rolled_back"] is True and "aborted" in result["message"], result
    assert journal(a, mid)["phase"] == "rolled-back"
    assert_clean_failure(dep, guest, before)

    # Ctrl-C of `migsec migrate --live` is the same abort
    before = guest.console("a").counters[-1]
    code, out, err = interrupt_live_move(dep, guest, lambda proc: proc.send_signal(signal.SIGINT))
    assert "Ctrl-C: aborting migration" in err, err
    assert code == 4, (out, err)
    assert json.loads(out)["rolled_back"] is True
    assert_clean_failure(dep, guest, before)
    for d in (a, b):
        audit_ok(d)


def test_live_timeout_rolls_back_cleanly(dep, guest):
    """--timeout passing while libvirt migrates aborts libvirt's job: the guest runs on at A (same
    boot), nothing of it is left at B. At 5 MiB/s (which also throttles the NBD mirror over the
    disk's whole virtual size) the move cannot finish within the 20 s."""
    a, b = dep["a"], dep["b"]
    before = guest.console("a").counters[-1]
    code, result, err = migrate_from(dep, "a", guest.name, "--live", "--bandwidth", "5", "--timeout", "20",
                                     "--persistent", "--undefinesource")
    assert code == 4, (err, result)
    assert result["rolled_back"] is True and "--timeout" in result["message"], result
    mid = result.get("migration_id") or _last_migration(a)
    assert journal(a, mid)["phase"] == "rolled-back"
    assert_clean_failure(dep, guest, before)
    for d in (a, b):
        audit_ok(d)


def test_live_destination_daemon_killed_mid_migration(dep, guest):
    """B's migsecd dies while libvirt migrates: the guest stays at A; `migsec recover` cleans B."""
    a, b = dep["a"], dep["b"]
    before = guest.console("a").counters[-1]
    code, out, err = interrupt_live_move(dep, guest, lambda proc: (time.sleep(1.0), b.kill(signal.SIGKILL)),
                                         after=b.start)
    assert code == 4, (out, err)
    assert json.loads(out)["rolled_back"] is True
    guest.assert_runs_only_on("a")
    rec = b.migsec("recover", "--json", "--config", str(b.config))
    assert rec.returncode == 0, rec.stderr
    outcomes = recovery_outcomes(b, rec)  # migsecd's automatic pass at start, or this one
    assert any("aborted" in outcome for outcome in outcomes), outcomes
    assert_clean_failure(dep, guest, before)
    for d in (a, b):
        audit_ok(d)


def test_live_source_daemon_killed_mid_migration_then_recover(dep, guest):
    """A's migsecd dies while libvirt migrates: libvirt rolls back; `migsec recover` at A finds the guest
    still here and journals the rollback; B cleaned up on its own when the session broke."""
    a, b = dep["a"], dep["b"]
    before = guest.console("a").counters[-1]
    code, out, err = interrupt_live_move(dep, guest, lambda proc: (time.sleep(1.0), a.kill(signal.SIGKILL)),
                                         after=a.start)
    assert code != 0, (out, err)
    rec = a.migsec("recover", "--json", "--config", str(a.config))
    assert rec.returncode == 0, rec.stderr
    outcomes = recovery_outcomes(a, rec)  # migsecd's automatic pass at start, or this one
    assert any("rolled back" in outcome for outcome in outcomes), outcomes
    assert_clean_failure(dep, guest, before)
    for d in (a, b):
        audit_ok(d)


def journal_file(domain, mid: str) -> dict:
    return json.loads((domain.base / "state" / "journal" / f"{mid}.json").read_text())


def new_journal(domain, known: set, test) -> dict | None:
    """A journal entry of ``domain`` not in ``known`` for which ``test(entry)`` holds."""
    for path in set((domain.base / "state" / "journal").glob("*.json")) - known:
        try:
            entry = json.loads(path.read_text())
        except ValueError:
            continue  # being replaced
        if test(entry):
            return entry
    return None


def finished_at_b(entry: dict) -> bool:
    """B's journal says libvirt's Finish left the guest paused there (its receipt journaled)."""
    return bool(entry["data"].get("finished")) and entry["data"].get("receipt") is not None


def test_live_source_daemon_killed_after_finish_then_recovered(dep, guest):
    """A's migsecd is killed right after B saw libvirt's Finish succeed (guest paused at B, A's
    libvirt may or may not have its reply): A's migsecd restarts (automatic recovery) and
    `migsec recover` runs: the guest runs on exactly one side, as the same boot with its memory
    and disk intact, nothing of it is left on the other side, both ledgers verify."""
    a, b = dep["a"], dep["b"]
    boots = len(guest.console("a").boots)
    last = guest.console("a").counters[-1]
    known = set((b.base / "state" / "journal").glob("*.json"))
    proc = migrate_in_background(dep, guest.name, "--live", "--persistent", "--undefinesource")
    try:
        deadline = time.monotonic() + 240
        entry = None
        while entry is None and time.monotonic() < deadline and proc.poll() is None:
            entry = new_journal(b, known, finished_at_b)
            time.sleep(0.01)
        assert entry is not None, "B's journal never said libvirt's Finish left the guest paused there"
        a.kill(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        a.start()
    mid = entry["migration_id"]
    rec = a.migsec("recover", "--json", "--config", str(a.config))
    assert rec.returncode == 0, rec.stderr

    def settled() -> bool:
        ends = (journal_file(a, mid)["phase"], journal_file(b, mid)["phase"])
        if ends in (("done", "done"), ("rolled-back", "discarded")):
            return True
        a.migsec("recover", "--config", str(a.config))  # B was busy or unreachable: try again
        return False

    wait_for(settled, 120, f"both journals of {mid} to end (A: {journal_file(a, mid)['phase']}, "
                           f"B: {journal_file(b, mid)['phase']})")
    running = [h for h in ("a", "b") if guest.state(h) == "running"]
    assert len(running) == 1, {h: guest.state(h) for h in ("a", "b")}
    host = running[0]
    other = "b" if host == "a" else "a"
    guest.assert_runs_only_on(host)
    assert guest.state(other) == "absent", guest.state(other)  # destroyed and undefined, or moved away
    assert not images(dep, other, guest.name)
    if host == "a":
        assert len(guest.console("a").boots) == boots, "the guest rebooted at A"
        assert not guest.console("b").counters, "the paused copy ran at B"
    else:
        wait_for(lambda: guest.console("b").counters, 30, "the guest counting at B")
        assert not guest.console("b").boots, "the guest rebooted at B"
        assert_counter_continues(guest.console("b").counters[0], last)
    assert_state_intact(guest, host, last)
    assert not run_dirs(dep, "a") and not run_dirs(dep, "b")
    for d in (a, b):
        audit_ok(d)


@pytest.mark.parametrize("rogue_source", ["drop-finish-reply"], indirect=True)
def test_live_finish_reply_lost_then_a_aborts_and_b_destroys_its_paused_copy(dep, guest, rogue_source):
    """Issue 10's window: B's libvirt Finish succeeds but its reply never reaches A's libvirtd, whose
    Confirm(cancelled) resumes the guest at A. The guest waited paused at B (VIR_MIGRATE_PAUSED), so
    A's abort makes B destroy that copy: the guest never ran at B and runs on at A only."""
    a, b = dep["a"], dep["b"]
    before = guest.console("a").counters[-1]
    known = set((b.base / "state" / "journal").glob("*.json"))
    code, result, err = migrate_from(dep, "a", guest.name, "--live", "--persistent", "--undefinesource")
    assert code == 4, (err, result)
    assert result["rolled_back"] is True
    entry = new_journal(b, known, lambda e: e["role"] == "destination")
    assert entry is not None
    mid = entry["migration_id"]
    entry = wait_for(lambda: (e := journal_file(b, mid))["phase"] == "discarded" and e, 60,
                     "B to discard on A's abort")  # A returned once it sent the abort
    assert finished_at_b(entry), "the lever missed: B's libvirt Finish did not succeed"
    # B signed its receipt once its Finish reply went on, but no commit ever reached it
    assert not {"commit-received", "resumed", "done"} & {p for p, _ in entry["history"]}
    assert_clean_failure(dep, guest, before)
    assert not guest.console("b").counters, "the paused copy ran at B"
    assert [e["body"].get("outcome") for e in ledger_entries(a, mid, "decision")] == ["abort"]
    assert ledger_entries(b, mid, "decision"), "B did not audit A's abort"
    for d in (a, b):
        audit_ok(d)


def test_live_move_of_a_paused_guest_leaves_it_paused_at_b(dep, guest):
    """A guest paused at A before the move stays paused at B after the commit (B resumes only
    what ran), and runs on as the same boot once resumed there."""
    a, b = dep["a"], dep["b"]
    a.lab.host("a").virsh("suspend", guest.name)
    last = guest.console("a").counters[-1]
    code, result, err = migrate_from(dep, "a", guest.name, "--live", "--persistent", "--undefinesource")
    assert code == 0, (err, result)
    mid = result["migration_id"]
    assert guest.state("a") == "absent" and guest.state("b") == "paused"
    assert journal(a, mid)["phase"] == "done" and journal(b, mid)["phase"] == "done"
    b.lab.host("b").virsh("resume", guest.name)
    guest.assert_runs_only_on("b")
    assert not guest.console("b").boots, "the guest rebooted at B"
    assert_state_intact(guest, "b", last)
    for d in (a, b):
        audit_ok(d)

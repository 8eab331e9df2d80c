"""End-to-end: aborting a running migration (``migsec jobs abort``, Ctrl-C of ``migsec migrate``)
rolls it back like --timeout: the guest runs on A again and B keeps nothing."""
from __future__ import annotations

import json
import signal

import pytest

from tests.e2e.test_migration import audit_ok, journal, leftovers, migrate_in_background, wait_for

pytestmark = pytest.mark.lab


def _data_at_b(b, mib: int = 4) -> bool:
    return any(p.stat().st_blocks * 512 > mib * 1024 * 1024 for p in b.staging.glob("in-*/*.part"))


def _running(a) -> dict | None:
    proc = a.migsec("jobs", "--json", "--config", str(a.config))
    if proc.returncode != 0:
        return None
    rows = [r for r in json.loads(proc.stdout) if r.get("running") and r.get("progress")]
    return rows[0] if rows else None


def test_jobs_abort_rolls_back_a_running_migration(dep, guest):
    a, b = dep["a"], dep["b"]
    proc = migrate_in_background(dep, guest.name, "--bandwidth", "4")
    try:
        wait_for(lambda: _data_at_b(b), 90, "data arriving at B")
        row = wait_for(lambda: _running(a), 30, "a running migration with progress in `migsec jobs`")
        mid = row["migration_id"]
        # `migsec jobs` shows bytes and rate of the running migration
        assert row["progress"]["done"] > 0 and row["progress"]["rate"] > 0, row
        table = a.migsec("jobs", "--config", str(a.config))
        assert mid in table.stdout and "/s" in table.stdout, table.stdout
        aborted = a.migsec("jobs", "abort", mid[:12], "--config", str(a.config), timeout=180)
        proc.wait(timeout=180)
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    assert f"aborted migration {mid}" in aborted.stdout and "runs here again" in aborted.stdout, aborted.stdout
    assert proc.returncode == 4, (out, err)
    result = json.loads(out)
    assert result["rolled_back"] is True and "aborted by the operator" in result["message"], result
    guest.assert_runs_only_on("a")
    assert journal(a, mid)["phase"] == "rolled-back"
    wait_for(lambda: not leftovers(b, guest.name), 30, "B to discard the partial files")
    assert guest.state("b") == "absent"
    # an ended migration cannot be aborted again, and the refusal says why
    again = a.migsec("jobs", "abort", mid, "--config", str(a.config))
    assert again.returncode != 0 and "already ended (rolled-back)" in again.stderr, again.stderr
    for d in (a, b):
        audit_ok(d)


@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_or_sigterm_of_migrate_aborts_and_rolls_back(dep, guest, sig, name):
    a, b = dep["a"], dep["b"]
    proc = migrate_in_background(dep, guest.name, "--bandwidth", "4")
    try:
        wait_for(lambda: _data_at_b(b), 90, "data arriving at B")
        proc.send_signal(sig)
        proc.wait(timeout=180)
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"{name}: aborting migration" in err and f"{name} again detaches" in err, err
    assert proc.returncode == 4, (out, err)
    result = json.loads(out)
    assert result["rolled_back"] is True and "aborted by the operator" in result["message"], result
    guest.assert_runs_only_on("a")
    wait_for(lambda: not leftovers(b, guest.name), 30, "B to discard the partial files")
    for d in (a, b):
        audit_ok(d)


def test_second_ctrl_c_detaches_and_the_rollback_goes_on(dep, guest):
    a, b = dep["a"], dep["b"]
    proc = migrate_in_background(dep, guest.name, "--bandwidth", "4")
    said = []
    try:
        wait_for(lambda: _data_at_b(b), 90, "data arriving at B")
        proc.send_signal(signal.SIGINT)
        # the client says so once migsecd holds the abort request; then detach
        while not any("Ctrl-C: aborting" in line for line in said):
            line = proc.stderr.readline()
            assert line, said
            said.append(line)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        out, err = proc.stdout.read(), "".join(said) + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "detached: migsecd goes on with migration" in err, (out, err)
    assert json.loads(out)["detached"] is True
    # migsecd finishes the rollback without its client
    wait_for(lambda: guest.state("a") == "running", 120, "the guest running at A again")
    guest.assert_runs_only_on("a")
    wait_for(lambda: not leftovers(b, guest.name), 60, "B to discard the partial files")

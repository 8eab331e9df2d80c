"""Operator handles on a running outgoing migration: abort (raced against the commit
decision, refusals read from the journal) and progress (bytes, rate, ETA)."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from migsec.migration.jobs import (
    AbortRefusedError,
    AbortSwitch,
    MigrationAborted,
    ProgressTracker,
    abort_running,
    record,
)
from migsec.migration.journal import Journal

MID = "0123456789abcdef0123456789abcdef"


def _services(tmp_path, running=None):
    return SimpleNamespace(journal=Journal(tmp_path), running=running or {}, lock=threading.RLock())


def _job(services, phases):
    job = SimpleNamespace(mid=MID, domain="vm1", abort=AbortSwitch())
    for phase in phases:
        job.abort.guard(phase)
        record(services, MID, "source", phase, domain="vm1", peer="cloud-b.example")
    return job


def test_abort_before_the_decision_makes_the_commit_fail(tmp_path):
    services = _services(tmp_path)
    job = _job(services, ["requested", "authorized", "handshaken", "suspended", "streaming"])
    services.running[MID] = job
    reply = abort_running(services, migration_id=MID[:8], domain=None, reason="aborted by the operator")
    assert reply["migration_id"] == MID and reply["domain"] == "vm1" and not reply["finished"]
    with pytest.raises(MigrationAborted, match="aborted by the operator"):
        job.abort.check()  # where --timeout is checked: the transfer stops and rolls back
    with pytest.raises(MigrationAborted):
        job.abort.guard("committed")  # the decision can no longer be written
    job.abort.guard("aborted")  # the rollback's own phases pass
    job.abort.guard("rolled-back")


def test_abort_is_refused_once_the_source_decided_commit(tmp_path):
    services = _services(tmp_path)
    job = _job(services, ["requested", "authorized", "handshaken", "suspended", "streaming", "streamed",
                          "receipt-received", "committed"])
    services.running[MID] = job
    with pytest.raises(AbortRefusedError, match="decided commit"):
        abort_running(services, migration_id=MID, domain=None, reason="x")
    job.abort.check()  # nothing was set: the migration completes at B


def test_abort_of_a_migration_not_running_here_is_explained_from_its_journal(tmp_path):
    services = _services(tmp_path)
    _job(services, ["requested", "authorized", "handshaken", "suspended", "streaming", "streamed",
                    "receipt-received", "committed", "released"])
    with pytest.raises(AbortRefusedError, match="past the commit decision .released.*cloud-b.example"):
        abort_running(services, migration_id=MID, domain=None, reason="x")
    other = "f" * 32
    record(services, other, "source", "suspended", domain="vm2", peer="cloud-b.example")
    with pytest.raises(AbortRefusedError, match="not running in this migsecd.*migsec recover"):
        abort_running(services, migration_id=other, domain=None, reason="x")
    incoming = "e" * 32
    record(services, incoming, "destination", "receiving", domain="vm3", peer="cloud-a.example")
    with pytest.raises(AbortRefusedError, match="incoming.*cloud-a.example"):
        abort_running(services, migration_id=incoming, domain=None, reason="x")
    with pytest.raises(AbortRefusedError, match="no migration 99"):
        abort_running(services, migration_id="99", domain=None, reason="x")
    with pytest.raises(AbortRefusedError, match="no migration of vm9 is running"):
        abort_running(services, migration_id=None, domain="vm9", reason="x")


def test_a_commit_recorded_elsewhere_is_never_refused_and_ends_aborts(tmp_path):
    """note() is for a decision made elsewhere (libvirt's, live): it records, never raises."""
    switch = AbortSwitch()
    switch.request("operator")
    switch.note("streaming")
    switch.note("committed")  # no raise, although an abort was asked for
    assert switch.decided
    fresh = AbortSwitch()
    fresh.note("committed")
    with pytest.raises(AbortRefusedError, match="decided commit"):
        fresh.request("operator")


def test_a_live_migration_takes_the_abort_until_the_commit(tmp_path):
    services = _services(tmp_path)
    job = _job(services, ["requested", "authorized", "handshaken", "streaming"])
    job.request = SimpleNamespace(mode="live")
    services.running[MID] = job
    abort_running(services, migration_id=MID, domain=None, reason="operator")
    with pytest.raises(MigrationAborted, match="operator"):
        job.abort.check()  # what live._watch acts on: it aborts libvirt's job
    committed = SimpleNamespace(mid=MID, domain="vm1", abort=AbortSwitch(), request=SimpleNamespace(mode="live"))
    committed.abort.note("committed")  # libvirt's Confirm, journaled by the live flow
    services.running[MID] = committed
    with pytest.raises(AbortRefusedError, match="decided commit"):
        abort_running(services, migration_id=MID, domain=None, reason="too late")


def test_a_live_move_refuses_aborts_once_libvirt_stopped_the_source_copy(tmp_path):
    services = _services(tmp_path)
    job = _job(services, ["requested", "authorized", "handshaken", "streaming"])
    services.running[MID] = job
    assert job.abort.past_return("libvirt moved vm1 to cloud-b: it can no longer be aborted")
    with pytest.raises(AbortRefusedError, match="libvirt moved vm1"):
        abort_running(services, migration_id=MID, domain=None, reason="operator")
    job.abort.check()  # nothing to act on
    # an abort that raced the move's end is reported as too late, not silently dropped
    late = _job(services, [])
    late.abort.request("operator")
    assert not late.abort.past_return("moved")


def test_abort_and_commit_race_exactly_one_wins():
    for _ in range(200):
        switch = AbortSwitch()
        outcome = {}

        def commit():
            try:
                switch.guard("committed")
                outcome["commit"] = True
            except MigrationAborted:
                outcome["commit"] = False

        def abort():
            try:
                switch.request("operator")
                outcome["abort"] = True
            except AbortRefusedError:
                outcome["abort"] = False

        threads = [threading.Thread(target=commit), threading.Thread(target=abort)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcome["commit"] != outcome["abort"], outcome


def test_progress_tracker_rate_and_eta_and_unknown_total():
    now = [0.0]
    tracker = ProgressTracker(clock=lambda: now[0])
    assert tracker.snapshot() is None
    for t, done in ((0.0, 0), (1.0, 10 * 2**20), (2.0, 20 * 2**20)):
        now[0] = t
        tracker.update("disk0", done, 100 * 2**20)
    snap = tracker.snapshot()
    assert snap["rate"] == pytest.approx(10 * 2**20) and snap["eta"] == pytest.approx(8.0)
    now[0] = 3.0
    tracker.update("memory", 30 * 2**20, 0)  # the save image's size is not known yet
    snap = tracker.snapshot()
    assert snap["total"] == 0 and snap["eta"] is None and snap["rate"] > 0

"""Journal: legal phase moves, durability of every write, crash leftovers."""
from __future__ import annotations

import json
import multiprocessing
import os
import stat

import pytest

from migsec.migration.journal import (DESTINATION_PHASES, SOURCE_PHASES, Journal, allowed_next)
from migsec.errors import JournalError


class Clock:
    def __init__(self):
        self.t = 1_800_000_000.0

    def __call__(self):
        self.t += 1
        return self.t


@pytest.fixture
def journal(tmp_path):
    return Journal(tmp_path / "state", clock=Clock())


def test_source_happy_path(journal):
    e = journal.create("m1", "source", {"domain": "vm1", "peer": "cloud-b.example"})
    assert e.phase == "requested" and e.data["domain"] == "vm1" and not e.decided
    for phase in SOURCE_PHASES[1:]:
        e = journal.advance("m1", phase)
        if phase == "committed":
            assert e.decided
    assert e.phase == "done" and e.terminal
    assert [p for p, _ in e.history] == list(SOURCE_PHASES)
    assert [t for _, t in e.history] == sorted(t for _, t in e.history)
    assert journal.get("m1") == e
    with pytest.raises(JournalError, match="none: it is finished"):
        journal.advance("m1", "streaming")


def test_destination_happy_path(journal):
    journal.create("m2", "destination", {"source": "cloud-a.example"})
    for phase in DESTINATION_PHASES[1:]:
        journal.advance("m2", phase)
    assert journal.get("m2").phase == "done"


def test_fields_merge_and_progress_reenters_phase(journal):
    journal.create("m1", "source")
    journal.advance("m1", "streaming", acked={"disk0": 0})
    e = journal.advance("m1", "streaming", acked={"disk0": 1048576}, attempt=2)
    assert e.data == {"acked": {"disk0": 1048576}, "attempt": 2}
    assert [p for p, _ in e.history].count("streaming") == 1
    with pytest.raises(TypeError):
        e.data["x"] = 1


@pytest.mark.parametrize("role, path, bad, why", [
    ("source", ["authorized"], "requested", "back"),
    ("source", ["streamed"], "done", "done without a decision"),
    ("source", ["committed"], "aborted", "abort after the decision"),
    ("source", ["committed"], "rolled-back", "rollback after the decision"),
    ("source", ["aborted"], "streaming", "continue after abort"),
    ("source", ["aborted", "rolled-back"], "aborted", "terminal"),
    ("destination", ["restored-paused"], "resumed", "resume without commit"),
    ("destination", ["commit-received"], "discarded", "discard after commit"),
    ("destination", ["receiving"], "committed", "source phase"),
])
def test_illegal_moves_are_refused_and_leave_state(journal, role, path, bad, why):
    journal.create("m", role)
    for phase in path:
        journal.advance("m", phase)
    before = journal.get("m")
    with pytest.raises(JournalError, match=f"cannot go from '{path[-1]}' to '{bad}'"):
        journal.advance("m", bad)
    assert journal.get("m") == before


def test_abort_paths(journal):
    journal.create("a", "source")
    journal.advance("a", "saved")  # skipping forward is allowed
    journal.advance("a", "aborted", reason="peer vanished")
    e = journal.advance("a", "rolled-back")
    assert e.terminal and not e.decided and e.data["reason"] == "peer vanished"
    journal.create("b", "destination")
    journal.advance("b", "receiving")
    assert journal.advance("b", "discarded").terminal


def test_allowed_next_table():
    assert allowed_next("source", ("requested", "committed")) == ("committed", "released", "done")
    assert "done" not in allowed_next("destination", ("accepted",))
    assert allowed_next("destination", ("accepted", "discarded")) == ()


def test_list_and_active_only(journal):
    journal.create("m1", "source")
    journal.create("m2", "destination")
    journal.advance("m2", "discarded")
    journal.create("m3", "source")
    assert [e.migration_id for e in journal.list()] == ["m1", "m2", "m3"]
    assert [e.migration_id for e in journal.list(active_only=True)] == ["m1", "m3"]
    with pytest.raises(JournalError, match="still 'requested'"):
        journal.remove("m1")
    journal.remove("m2")
    assert [e.migration_id for e in journal.list()] == ["m1", "m3"]


def test_state_survives_a_new_journal_object(tmp_path):
    Journal(tmp_path).create("m1", "source", {"vm": "guest"})
    Journal(tmp_path).advance("m1", "authorized", ticket="abc")
    e = Journal(tmp_path).get("m1")
    assert e.phase == "authorized" and e.data == {"vm": "guest", "ticket": "abc"}
    f = tmp_path / "journal/m1.json"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_crash_leaves_truncated_temp_file_previous_state_wins(tmp_path):
    j = Journal(tmp_path)
    j.create("m1", "source")
    j.advance("m1", "suspended")
    good = j.get("m1")
    # a crash in the middle of writing the next state: half a temp file, no rename
    full = json.dumps({"migration_id": "m1", "role": "source", "phase": "saved"}).encode()
    tmp = tmp_path / "journal/.m1.json.4242.tmp"
    tmp.write_bytes(full[: len(full) // 2])
    older = tmp_path / "journal/.m1.json.tmp"  # the temp name before fsutil
    older.write_bytes(full[: len(full) // 2])
    assert j.get("m1") == good
    assert [e.migration_id for e in j.list()] == ["m1"]
    # the restarted daemon drops the leftover and carries on from the durable state
    j2 = Journal(tmp_path)
    assert not tmp.exists() and not older.exists()
    assert j2.get("m1") == good
    assert j2.advance("m1", "saved").phase == "saved"


def test_failed_write_keeps_previous_state(tmp_path, monkeypatch):
    j = Journal(tmp_path)
    j.create("m1", "source")
    good = j.get("m1")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(JournalError, match="cannot write the journal entry: No space left"):
        j.advance("m1", "authorized")
    monkeypatch.undo()
    assert j.get("m1") == good
    assert not list((tmp_path / "journal").glob(".*.tmp"))


def test_corrupt_entry_is_reported_not_guessed(tmp_path):
    j = Journal(tmp_path)
    j.create("m1", "source")
    f = tmp_path / "journal/m1.json"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(JournalError, match="m1.json: journal entry is corrupt"):
        j.get("m1")
    with pytest.raises(JournalError, match="corrupt"):
        j.list()


@pytest.mark.parametrize("bad_id", ["../x", "", ".hidden", "a/b", "x" * 129, None])
def test_bad_ids_and_fields(journal, bad_id):
    with pytest.raises(JournalError, match="invalid migration id"):
        journal.create(bad_id, "source")


def test_bad_role_fields_and_duplicates(journal):
    with pytest.raises(JournalError, match="role"):
        journal.create("m", "middle")
    with pytest.raises(JournalError, match="plain JSON"):
        journal.create("m", "source", {"when": object()})
    journal.create("m", "source")
    with pytest.raises(JournalError, match="already"):
        journal.create("m", "source")
    with pytest.raises(JournalError, match="reserved"):
        journal.advance("m", "authorized", phase="x")
    with pytest.raises(JournalError, match="no migration nope"):
        journal.get("nope")


def _advance_many(state_dir, n):
    j = Journal(state_dir)
    for i in range(n):
        j.advance("shared", "streaming", **{f"k{os.getpid()}_{i}": i})


def test_concurrent_writers_in_two_processes_lose_no_update(tmp_path):
    Journal(tmp_path).create("shared", "source")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_advance_many, args=(tmp_path, 20)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(Journal(tmp_path).get("shared").data) == 40

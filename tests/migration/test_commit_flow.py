"""Both cold orchestrators through the commit exchange, and recovery after its in-session failures.

A's ``OutgoingMigration`` runs against B's real peer endpoint (``orchestration.pair``) on libvirt's
test driver, as in test_source_flow.py, but with the three operations the test driver lacks (a
paused save framed as QEMU's, the image's XML inside that frame, a paused restore with B's XML)
done at a seam (``orchestration.QemuLike``): the flow reaches B's receipt, A's decision and B's
Resumed. Asserted: both journals (each side written by its commit machine alone), the guests'
states, the files and the ledgers; where a branch leaves work for ``migsec recover``, recovery
is run and must finish it with the same decision.
"""
from __future__ import annotations

import dataclasses

import pytest

from migsec import virt
from migsec.audit import Ledger
from migsec.migration.jobs import MigrationAborted
from migsec.migration.recovery import recover_one
from migsec.migration.source import OutgoingMigration
from migsec.errors import MigrationFailed
from migsec.protocol import Decision, Receipt
from orchestration import A_DID, B_DID, Endpoint, QemuLike, phases

A_COMMITTED = ["requested", "authorized", "handshaken", "suspended", "streaming", "streamed", "saved",
               "receipt-received", "committed"]
B_RESTORED = ["accepted", "receiving", "received", "restored-paused"]


@pytest.fixture
def qemu(monkeypatch):
    return QemuLike(monkeypatch)


def kinds(services, mid):
    return [(e.kind, e.body.get("outcome")) for e in Ledger(services.config.paths.ledger).entries()
            if e.migration_id == mid]


def run(p, grant):
    job = OutgoingMigration(p.a, grant, p.events.append)
    try:
        return job, job.run()
    finally:
        p.endpoint.wait_idle()


def test_a_cold_move_commits_once_and_b_runs_the_guest(p, qemu):
    disk = p.guest("vm1")
    grant = p.grant("vm1")
    mid = grant.migration_id
    job, result = run(p, grant)
    assert result["migration_id"] == mid and result["downtime_seconds"] > 0
    assert phases(p.a, mid) == A_COMMITTED + ["released", "done"]
    assert phases(p.b, mid) == B_RESTORED + ["commit-received", "resumed", "done"]
    assert p.b.journal.get(mid).data["restored"] == "vm1-b" == qemu.restored[0]
    assert p.state("vm1-b") == "running" and p.state("vm1") == "shutoff"
    assert virt.moved_mark(p.conn, "vm1").migration_id == mid and p.a.journal.get(mid).data["marked"] is True
    # B's copy runs on B's disk (its [storage] image_dir), with A's bytes
    b_disk = p.root / "b" / "images" / disk.name
    assert b_disk.read_bytes() == disk.read_bytes()
    assert not (p.root / "a/state/staging" / f"out-{mid}").exists()
    assert not (p.root / "b/state/staging" / f"in-{mid}").exists()
    # one commit decision: the one A journaled is the one B journaled and both ledgers hold
    a_decision = p.a.journal.get(mid).data["decision"]
    assert p.b.journal.get(mid).data["decision"] == a_decision
    assert "abort_decision" not in p.a.journal.get(mid).data
    assert ("decision", "commit") in kinds(p.a, mid) and ("resumed", None) in kinds(p.b, mid)
    assert p.a.journal.get(mid).data["resumed"] == p.b.journal.get(mid).data["resumed"]


def test_a_restore_that_fails_at_b_rolls_back_a_from_its_save_image(p, qemu):
    p.guest("vm1")
    qemu.fail_restore = True
    grant = p.grant("vm1")
    mid = grant.migration_id
    with pytest.raises(MigrationFailed, match="rolled back.*aborted: an internal error"):
        run(p, grant)
    # B discarded before any receipt and said so; A, whose guest the save had stopped, restores it
    assert phases(p.b, mid) == ["accepted", "receiving", "received", "discarded"]
    assert phases(p.a, mid) == ["requested", "authorized", "handshaken", "suspended", "streaming", "streamed",
                                "aborted", "rolled-back"]
    assert p.a.journal.get(mid).data["how"] == "restored from its save image"
    assert p.state("vm1") == "running" and qemu.restored == []
    assert not (p.root / "a/state/staging" / f"out-{mid}").exists()
    assert not (p.root / "b/state/staging" / f"in-{mid}").exists()
    assert ("decision", "abort") in kinds(p.a, mid) and ("decision", "commit") not in kinds(p.a, mid)


def test_a_receipt_a_cannot_verify_aborts_once_and_b_discards_its_paused_copy(p, qemu, monkeypatch):
    p.guest("vm1")
    real_sign = Receipt.sign
    monkeypatch.setattr(Receipt, "sign", lambda self, key: real_sign(self, p.a.identity.key))  # not B's key
    grant = p.grant("vm1")
    mid = grant.migration_id
    with pytest.raises(MigrationFailed, match="rolled back"):
        run(p, grant)
    assert phases(p.a, mid) == A_COMMITTED[:-2] + ["aborted", "rolled-back"]
    assert "receipt refused" in p.a.journal.get(mid).data["reason"]
    assert p.state("vm1") == "running"
    # B restored paused, signed its receipt, then got A's abort: its paused copy is gone
    assert phases(p.b, mid) == B_RESTORED + ["discarded"]
    assert p.state("vm1-b") == "absent"
    # one abort decision: the one A's machine journaled is the one A ledgered and B applied
    abort = p.a.journal.get(mid).data["abort_decision"]
    assert p.b.journal.get(mid).data["decision"] == abort
    ledgered = [e.body["token"] for e in Ledger(p.a.config.paths.ledger).entries()
                if e.migration_id == mid and e.kind == "decision"]
    assert ledgered == [abort]


def test_a_receipt_for_another_session_is_refused_and_b_discards_its_paused_copy(p, qemu, monkeypatch):
    # B's key signs a receipt for the right streams but another session's transcript hash (a
    # receipt replayed from, or relayed to, another session): A must abort, as for other digests
    p.guest("vm1")
    real_sign = Receipt.sign
    monkeypatch.setattr(Receipt, "sign", lambda self, key: real_sign(
        dataclasses.replace(self, transcript_hash=bytes(b ^ 1 for b in self.transcript_hash)), key))
    grant = p.grant("vm1")
    mid = grant.migration_id
    with pytest.raises(MigrationFailed, match="rolled back.*another session"):
        run(p, grant)
    assert phases(p.a, mid) == A_COMMITTED[:-2] + ["aborted", "rolled-back"]
    assert not p.a.journal.get(mid).decided and p.state("vm1") == "running"
    assert phases(p.b, mid) == B_RESTORED + ["discarded"] and p.state("vm1-b") == "absent"
    assert p.b.journal.get(mid).data["decision"] == p.a.journal.get(mid).data["abort_decision"]
    assert ("decision", "abort") in kinds(p.a, mid) and ("decision", "commit") not in kinds(p.a, mid)


def test_an_operator_abort_while_b_restores_wins_over_the_commit(p, qemu, monkeypatch):
    p.guest("vm1")
    grant = p.grant("vm1")
    mid = grant.migration_id
    job = OutgoingMigration(p.a, grant, p.events.append)
    restore = qemu.restore_domain

    def restore_then_abort(*a, **kw):  # A waits for the receipt now: its next step is the decision
        name = restore(*a, **kw)
        job.abort.request("aborted by the operator (test)")
        return name

    monkeypatch.setattr(virt, "restore_domain", restore_then_abort)
    with pytest.raises(MigrationFailed, match="by the operator") as err:
        try:
            job.run()
        finally:
            p.endpoint.wait_idle()
    assert isinstance(err.value.__cause__, MigrationAborted)
    # the machine's "committed" lost against the abort: nothing after receipt-received
    assert phases(p.a, mid) == A_COMMITTED[:-1] + ["aborted", "rolled-back"]
    assert not p.a.journal.get(mid).decided and p.state("vm1") == "running"
    assert phases(p.b, mid) == B_RESTORED + ["discarded"] and p.state("vm1-b") == "absent"


def abort_at_first_progress(p, grant) -> None:
    """Run A's migration and abort it as an operator would at its first progress report (while
    the streams flow, before the manifest); the run fails with that abort."""
    holder: dict = {}

    def emit(event):
        if event.get("event") == "progress":
            holder["job"].abort.request("aborted by the operator (test)")

    job = holder["job"] = OutgoingMigration(p.a, grant, emit)
    with pytest.raises(MigrationFailed, match="by the operator"):
        try:
            job.run()
        finally:
            p.endpoint.wait_idle()


def test_an_operator_abort_while_b_receives_reaches_b_as_a_s_signed_decision(p, qemu):
    # the abort comes while the streams flow (A's first progress report, before the manifest):
    # A's abort Decision reaches B inside its data session; B applies it as the decision it is
    p.guest("vm1")
    grant = p.grant("vm1")
    mid = grant.migration_id
    abort_at_first_progress(p, grant)
    assert phases(p.a, mid) == ["requested", "authorized", "handshaken", "suspended", "streaming",
                                "aborted", "rolled-back"]
    assert p.state("vm1") == "running"
    # B journaled A's signed abort (not a failure of its own), ledgered it, and removed its files
    assert phases(p.b, mid) == ["accepted", "receiving", "discarded"]
    b_entry = p.b.journal.get(mid)
    abort = p.a.journal.get(mid).data["abort_decision"]
    assert b_entry.data["decision"] == abort and "reason" not in b_entry.data
    assert Decision.verify(abort, p.a.identity.public_key, migration_id=mid).decision == "abort"
    b_decisions = [e.peer["token"] for e in Ledger(p.b.config.paths.ledger).entries()
                   if e.migration_id == mid and e.kind == "decision"]
    assert b_decisions == [abort]
    assert not (p.root / "b/state/staging" / f"in-{mid}").exists() and qemu.restored == []


def test_a_decision_b_cannot_verify_while_it_receives_is_refused_and_b_discards_on_its_own(p, qemu, monkeypatch):
    p.guest("vm1")
    real_sign = Decision.sign
    monkeypatch.setattr(Decision, "sign", lambda self, key: real_sign(self, p.b.identity.key))  # not A's key
    grant = p.grant("vm1")
    mid = grant.migration_id
    abort_at_first_progress(p, grant)
    assert p.state("vm1") == "running"
    # B does not take it for A's word: no decision journaled, its own discard with why
    assert phases(p.b, mid) == ["accepted", "receiving", "discarded"]
    b_entry = p.b.journal.get(mid)
    assert "decision" not in b_entry.data and "refused the source's decision" in b_entry.data["reason"]
    assert not (p.root / "b/state/staging" / f"in-{mid}").exists()


def test_a_resume_that_fails_at_b_after_the_commit_is_finished_by_recovery(p, qemu, monkeypatch):
    p.guest("vm1")
    grant = p.grant("vm1")
    mid = grant.migration_id
    real_resume = virt.resume_domain
    broken = {"on": True}

    def resume(conn, name):
        if broken["on"] and name == "vm1-b":
            from migsec.errors import VirtError

            raise VirtError("resume failed (test seam)")
        return real_resume(conn, name)

    monkeypatch.setattr(virt, "resume_domain", resume)
    with pytest.raises(MigrationFailed, match="committed to cloud-b.example but it did not confirm"):
        run(p, grant)
    # A decided commit and stays stopped; B holds the decision and keeps its copy paused
    assert phases(p.a, mid) == A_COMMITTED
    assert phases(p.b, mid) == B_RESTORED + ["commit-received"]
    assert p.state("vm1") == "shutoff" and p.state("vm1-b") == "paused"
    broken["on"] = False
    # B recovers first: the decision is durable here, so it resumes without asking
    assert recover_one(p.b, p.b.journal.get(mid)) == "committed: vm1 runs here"
    assert phases(p.b, mid)[-3:] == ["commit-received", "resumed", "done"]
    assert p.state("vm1-b") == "running"
    # A recovers: releases its copy, B confirms with the Resumed it signed in its recovery
    assert recover_one(p.a, p.a.journal.get(mid)) == f"committed: vm1 runs at {B_DID}"
    p.endpoint.wait_idle()
    assert phases(p.a, mid)[-3:] == ["committed", "released", "done"]
    assert p.a.journal.get(mid).data["resumed"] == p.b.journal.get(mid).data["resumed"]
    assert p.state("vm1") == "shutoff" and virt.moved_mark(p.conn, "vm1").migration_id == mid


def test_a_link_cut_after_b_restored_leaves_b_in_doubt_until_a_answers_its_abort(p, qemu, monkeypatch):
    p.guest("vm1")
    p.endpoint.cuttable = True
    restore = qemu.restore_domain

    def restore_then_cut(*a, **kw):
        name = restore(*a, **kw)
        p.endpoint.cut.set()  # the receipt never reaches A, A's abort never reaches B
        return name

    monkeypatch.setattr(virt, "restore_domain", restore_then_cut)
    grant = p.grant("vm1")
    mid = grant.migration_id
    with pytest.raises(MigrationFailed, match="rolled back"):
        run(p, grant)
    # A never saw the receipt: undecided, it aborts and restarts its guest from the save image
    assert phases(p.a, mid) == A_COMMITTED[:-3] + ["aborted", "rolled-back"]
    assert p.state("vm1") == "running"
    # B issued its receipt: in doubt, its copy stays paused and its files stay
    assert phases(p.b, mid) == B_RESTORED and p.state("vm1-b") == "paused"
    # B's recovery asks A, which answers the abort its machine journaled (the same decision)
    monkeypatch.setattr(virt, "restore_domain", restore)
    p.endpoint.cuttable = False
    listener = Endpoint(p.a, p.a.listen[1])
    try:
        outcome = recover_one(p.b, p.b.journal.get(mid))
    finally:
        listener.close()
    assert outcome == f"aborted by {A_DID}: partial files and any paused copy removed here"
    assert phases(p.b, mid) == B_RESTORED + ["discarded"] and p.state("vm1-b") == "absent"
    assert p.b.journal.get(mid).data["decision"] == p.a.journal.get(mid).data["abort_decision"]
    assert not (p.root / "b/state/staging" / f"in-{mid}").exists()
    assert p.a.journal.get(mid).phase == "rolled-back"  # A's side was finished already


def test_b_crashing_between_its_restore_and_journaling_it_leaves_a_copy_recovery_finds(p, qemu, monkeypatch):
    # B's migsecd dies right after libvirt restored the guest paused, before "restored-paused"
    # (its name, receipt) is durable: the journal says only "received", with the name B was
    # about to restore under, and recovery's abort must destroy the paused copy found under it
    from migsec.migration.destination import IncomingMigration

    p.guest("vm1")
    real_journal = IncomingMigration.journal

    def crash_at_restored_paused(self, phase, **fields):
        if phase == "restored-paused":
            raise RuntimeError("B's migsecd killed (test)")  # no handler of migsecd's catches it
        real_journal(self, phase, **fields)

    monkeypatch.setattr(IncomingMigration, "journal", crash_at_restored_paused)
    grant = p.grant("vm1")
    mid = grant.migration_id
    with pytest.raises(MigrationFailed, match="rolled back"):
        run(p, grant)
    assert phases(p.a, mid)[-2:] == ["aborted", "rolled-back"] and p.state("vm1") == "running"
    entry = p.b.journal.get(mid)
    assert phases(p.b, mid) == ["accepted", "receiving", "received"] and "restored" not in entry.data
    assert entry.data["restoring"] == "vm1-b" == qemu.restored[0] and p.state("vm1-b") == "paused"
    # B restarts (a fresh IncomingMigration, nothing in memory): its recovery asks A
    monkeypatch.setattr(IncomingMigration, "journal", real_journal)
    listener = Endpoint(p.a, p.a.listen[1])
    try:
        outcome = recover_one(p.b, p.b.journal.get(mid))
    finally:
        listener.close()
    assert outcome == f"aborted by {A_DID}: partial files and any paused copy removed here"
    assert phases(p.b, mid) == ["accepted", "receiving", "received", "discarded"]
    assert p.state("vm1-b") == "absent" and p.state("vm1") == "running"
    assert p.b.journal.get(mid).data["decision"] == p.a.journal.get(mid).data["abort_decision"]
    assert not (p.root / "b/state/staging" / f"in-{mid}").exists()


def test_b_refuses_to_restore_under_the_name_of_a_guest_active_here(p, qemu):
    # a guest of that name already runs at B: B refuses before it journals the name or restores,
    # so that discarding this migration can never destroy that other guest
    p.guest("vm1")
    p.guest("vm1-b", disk_bytes=4096)  # B's own guest, under the name B would restore vm1 as
    grant = p.grant("vm1")
    mid = grant.migration_id
    with pytest.raises(MigrationFailed, match="rolled back"):
        run(p, grant)
    assert phases(p.b, mid) == ["accepted", "receiving", "discarded"]
    assert "restoring" not in p.b.journal.get(mid).data and qemu.restored == []
    assert p.state("vm1-b") == "running" and p.state("vm1") == "running"


def test_a_save_that_fails_after_its_image_was_streamed_never_commits(p, qemu, monkeypatch):
    # libvirt can report a failed save after the image's final magic (QEMU stopping): A must
    # not commit to an image libvirt did not vouch for, even with B's receipt in hand
    p.guest("vm1")
    save = qemu.save_domain

    def save_then_fail(*a, **kw):
        save(*a, **kw)
        from migsec.errors import VirtError

        raise VirtError("save (paused) failed after writing the image (test seam)")

    monkeypatch.setattr(virt, "save_domain", save_then_fail)
    grant = p.grant("vm1")
    mid = grant.migration_id
    with pytest.raises(MigrationFailed, match="rolled back"):
        run(p, grant)
    a = phases(p.a, mid)
    assert a[-2:] == ["aborted", "rolled-back"] and "saved" not in a and "committed" not in a
    assert p.state("vm1") == "running"
    # B discarded whatever it had reached (a paused copy included), or keeps a staged part undecided
    entry = p.b.journal.get(mid)
    assert not entry.decided and p.state("vm1-b") in ("absent", "paused")
    if entry.phase == "discarded":
        assert p.state("vm1-b") == "absent"


def test_a_cut_while_streaming_resumes_on_a_new_connection_and_commits(p, qemu):
    disk = p.guest("vm1", disk_bytes=4 * 1024 * 1024)
    p.endpoint.drop_after, p.endpoint.drop_once = 256 * 1024, True  # the first connection only
    grant = p.grant("vm1")
    mid = grant.migration_id
    run(p, grant)
    assert p.endpoint.connections == 2
    a = phases(p.a, mid)
    assert a == A_COMMITTED + ["released", "done"]  # "streaming" re-entered by the second attempt
    assert p.a.journal.get(mid).data["attempt"] == 1
    assert phases(p.b, mid) == B_RESTORED + ["commit-received", "resumed", "done"]
    assert p.b.journal.get(mid).data["attempt"] == "resume"
    assert (p.root / "b" / "images" / disk.name).read_bytes() == disk.read_bytes()
    assert p.state("vm1-b") == "running" and p.state("vm1") == "shutoff"

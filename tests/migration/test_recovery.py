"""``migsec recover`` (``migsec.migration.recovery``) from each journal phase, on both sides, over a real link.

Each test writes the journals a crash would leave (through ``jobs.record``, the writer the
orchestrators use), puts the guests in the matching state in libvirt's test driver, runs
``recover_one`` on one side and lets the other side answer with migsecd's own code (its peer
endpoint: ``answer_recovery``). Recovery rebuilds each side's commit machine from that journal;
the in-session branches that leave work for recovery are in test_commit_flow.py. Asserted: the journal phases on both sides, the guests' states,
the staged files, the given-away mark and the ledger. The two sides share one test driver, so
A's guest is ``vm1`` and B's restored copy of it ``vm1b``.
"""
from __future__ import annotations

import pytest

from migsec import virt
from migsec.audit import Ledger
from migsec.migration.jobs import record
from migsec.migration.recovery import auto_recover, recover_all, recover_one
from migsec.protocol import Decision, Receipt, token_hash
from orchestration import A_DID, B_DID, Endpoint, phases


def kinds(services, mid):
    return [e.kind for e in Ledger(services.config.paths.ledger).entries() if e.migration_id == mid]


class Crash:
    """The journals and guests a crash left, at A (``vm1``) and B (``vm1b``)."""

    def __init__(self, p, *, a_phase: str | None, b_phase: str | None, a_state: str = "paused",
                 b_state: str = "paused") -> None:
        self.p = p
        p.guest("vm1")
        self.grant = p.grant("vm1")  # of a running guest: B resumes it after the commit
        self.mid = mid = self.grant.migration_id
        virt.suspend_domain(p.conn, "vm1")
        if a_state == "shutoff":  # saved: what a save leaves
            virt.save_domain(p.conn, "vm1", str(p.root / "a" / "vm1.save"))
        options = dict(self.grant.request.options)
        plan = self.grant.request.require_plan().to_dict()  # both orchestrators journal the signed plan
        self.staging = p.root / "b/state/staging" / f"in-{mid}"
        self.receipt = Receipt(migration_id=mid, src_did=A_DID, dest_did=B_DID, streams={"memory": b"\1" * 32},
                               transcript_hash=b"\2" * 32, issued_at=p.a.clock()).sign(p.b.identity.key)
        self.commit = Decision(migration_id=mid, src_did=A_DID, dest_did=B_DID, decision="commit",
                               issued_at=p.a.clock(), receipt_hash=token_hash(self.receipt)).sign(p.a.identity.key)
        if a_phase is not None:
            work = p.root / "a/state/staging" / f"out-{mid}"
            work.mkdir(parents=True)
            record(p.a, mid, "source", "authorized", domain="vm1", peer=B_DID, user="alice", options=options,
                   plan=plan, work_dir=str(work), save_image=str(p.root / "a" / "vm1.save"))
            for phase in ("handshaken", "suspended", "streaming", "streamed", "receipt-received", "committed"):
                fields = {"was_paused": False} if phase == "suspended" else {}
                if phase == "committed":
                    fields["decision"] = self.commit
                record(p.a, mid, "source", phase, **fields)
                if phase == a_phase:
                    break
        if b_phase is not None:
            if b_state != "absent":
                p.guest("vm1b", state=b_state)
            self.staging.mkdir(parents=True)
            (self.staging / "part").write_bytes(b"staged")
            record(p.b, mid, "destination", "accepted", domain="vm1", peer=A_DID, user="alice", options=options,
                   plan=plan, staging=str(self.staging))
            for phase in ("receiving", "received", "restored-paused", "commit-received"):
                # as IncomingMigration journals them: the name to restore under with "received"
                # (before the restore), the name restored under with "restored-paused"
                fields = {"restoring": "vm1b"} if phase == "received" else {}
                if phase == "restored-paused":
                    fields.update(receipt=self.receipt, restored="vm1b")
                if phase == "commit-received":
                    fields["decision"] = self.commit
                record(p.b, mid, "destination", phase, **fields)
                if phase == b_phase:
                    break


def recover_b_while_a_answers(p, mid: str) -> str:
    """B's ``recover_one`` with A's migsecd answering on its peer port."""
    listener = Endpoint(p.a, p.a.listen[1])
    try:
        return recover_one(p.b, p.b.journal.get(mid))
    finally:
        listener.close()


# ---- A recovers -------------------------------------------------------------------------------
@pytest.mark.parametrize("a_phase", ["suspended", "streamed", "receipt-received"])
def test_source_before_committed_rolls_back_and_b_discards(p, a_phase):
    c = Crash(p, a_phase=a_phase, b_phase="restored-paused")
    outcome = recover_one(p.a, p.a.journal.get(c.mid))
    p.endpoint.wait_idle()
    assert outcome == f"rolled back: vm1 resumed here; {B_DID} answered discarded"
    assert phases(p.a, c.mid)[-2:] == ["aborted", "rolled-back"]
    assert p.state("vm1") == "running"
    assert not (p.root / "a/state/staging" / f"out-{c.mid}").exists()
    assert p.b.journal.get(c.mid).phase == "discarded"
    assert p.state("vm1b") == "shutoff" and not c.staging.exists()  # B's paused copy destroyed
    assert "decision" in kinds(p.a, c.mid) and "decision" in kinds(p.b, c.mid)
    # B applied the one abort A's machine made and journaled
    assert p.b.journal.get(c.mid).data["decision"] == p.a.journal.get(c.mid).data["abort_decision"]


def test_source_before_committed_with_b_unreachable_still_rolls_back(p):
    c = Crash(p, a_phase="streamed", b_phase=None)
    p.endpoint.close()
    outcome = recover_one(p.a, p.a.journal.get(c.mid))
    assert outcome == f"rolled back: vm1 resumed here; {B_DID} unreachable (it will ask when it recovers)"
    assert p.a.journal.get(c.mid).phase == "rolled-back" and p.state("vm1") == "running"


def test_source_after_committed_releases_and_b_resumes(p):
    c = Crash(p, a_phase="committed", b_phase="restored-paused", a_state="shutoff")
    outcome = recover_one(p.a, p.a.journal.get(c.mid))
    p.endpoint.wait_idle()
    assert outcome == f"committed: vm1 runs at {B_DID}"
    assert phases(p.a, c.mid)[-3:] == ["committed", "released", "done"]
    assert p.state("vm1") == "shutoff" and virt.moved_mark(p.conn, "vm1").migration_id == c.mid
    assert p.a.journal.get(c.mid).data["marked"] is True
    assert phases(p.b, c.mid)[-3:] == ["commit-received", "resumed", "done"]
    assert p.state("vm1b") == "running" and not c.staging.exists()
    assert {"given-away", "resumed"} <= set(kinds(p.a, c.mid))


def test_source_after_committed_with_b_unreachable_releases_and_asks_again(p):
    c = Crash(p, a_phase="committed", b_phase="restored-paused", a_state="shutoff")
    p.endpoint.close()
    outcome = recover_one(p.a, p.a.journal.get(c.mid))
    assert outcome == f"committed: vm1 released here; {B_DID} has not confirmed yet (run recover again)"
    assert p.a.journal.get(c.mid).phase == "released" and p.state("vm1") == "shutoff"
    assert p.state("vm1b") == "paused"  # B never resumes without the decision
    p.endpoint = Endpoint(p.b, p.b.listen[1])
    assert recover_one(p.a, p.a.journal.get(c.mid)) == f"committed: vm1 runs at {B_DID}"
    p.endpoint.wait_idle()
    assert p.a.journal.get(c.mid).phase == "done" and p.state("vm1b") == "running"


@pytest.mark.parametrize("bad", ["discarded-at-b", "signed-by-another-key", "another-receipt"])
def test_a_commit_b_cannot_accept_changes_nothing_at_b(p, bad):
    c = Crash(p, a_phase="committed", b_phase="restored-paused", a_state="shutoff")
    if bad == "discarded-at-b":
        record(p.b, c.mid, "destination", "discarded")
    else:
        key = p.b.identity.key if bad == "signed-by-another-key" else p.a.identity.key
        other = Decision(migration_id=c.mid, src_did=A_DID, dest_did=B_DID, decision="commit",
                         issued_at=p.a.clock(), receipt_hash=b"\3" * 32 if bad == "another-receipt"
                         else token_hash(c.receipt)).sign(key)
        record(p.a, c.mid, "source", "committed", decision=other)  # what A's journal holds
    outcome = recover_one(p.a, p.a.journal.get(c.mid))
    p.endpoint.wait_idle()
    # B refuses (and says nothing): A has released its copy, has no confirmation, asks again later
    assert outcome == f"committed: vm1 released here; {B_DID} has not confirmed yet (run recover again)"
    assert p.a.journal.get(c.mid).phase == "released"
    expected = "discarded" if bad == "discarded-at-b" else "restored-paused"
    assert p.b.journal.get(c.mid).phase == expected and not p.b.journal.get(c.mid).decided
    assert p.state("vm1b") == "paused"  # never resumed on a decision B could not accept


def test_source_committed_without_a_decision_token_releases_and_never_rolls_back(p):
    # a live move libvirt committed whose exchange then failed journals "committed" (how=libvirt)
    # without a signed decision: it is still committed, so recovery releases and never resumes A
    c = Crash(p, a_phase="receipt-received", b_phase="restored-paused", a_state="shutoff")
    record(p.a, c.mid, "source", "committed", how="libvirt", problem="the link broke")
    outcome = recover_one(p.a, p.a.journal.get(c.mid))
    p.endpoint.wait_idle()
    assert outcome == f"committed: vm1 released here; {B_DID} has not confirmed yet (run recover again)"
    assert phases(p.a, c.mid)[-2:] == ["committed", "released"] and p.state("vm1") == "shutoff"
    assert p.b.journal.get(c.mid).phase == "restored-paused" and p.state("vm1b") == "paused"


def test_source_before_committed_whose_saved_guest_cannot_be_restored_reports_it(p):
    # before the decision, a guest already saved (shut off) is restored from its save image; the
    # test driver refuses the running/paused restore flag: recovery fails, saying so, and keeps
    # the journal where it was
    c = Crash(p, a_phase="streamed", b_phase=None, a_state="shutoff")
    actions = recover_all(p.a, lambda event: None)
    assert [a["migration_id"] for a in actions] == [c.mid]
    assert actions[0]["outcome"].startswith("failed: restore (running)")
    assert p.a.journal.get(c.mid).phase == "aborted" and p.state("vm1") == "shutoff"


# ---- B recovers -------------------------------------------------------------------------------
def test_destination_commit_received_resumes_without_asking(p):
    c = Crash(p, a_phase=None, b_phase="commit-received")
    assert p.state("vm1b") == "paused"
    p.endpoint.close()
    assert recover_one(p.b, p.b.journal.get(c.mid)) == "committed: vm1 runs here"
    assert phases(p.b, c.mid)[-3:] == ["commit-received", "resumed", "done"]
    assert p.state("vm1b") == "running" and not c.staging.exists()


def test_destination_undecided_asks_a_which_decided_commit(p):
    c = Crash(p, a_phase="committed", b_phase="restored-paused", a_state="shutoff")
    outcome = recover_b_while_a_answers(p, c.mid)
    assert outcome == f"committed by {A_DID}: vm1 runs here"
    assert phases(p.b, c.mid)[-3:] == ["commit-received", "resumed", "done"]
    assert p.state("vm1b") == "running" and not c.staging.exists()
    assert p.a.journal.get(c.mid).phase == "committed"  # A's side is A's own recovery


@pytest.mark.parametrize("a_phase, b_phase", [("suspended", "receiving"), ("streamed", "received"),
                                              ("receipt-received", "restored-paused")])
def test_destination_undecided_asks_a_which_rolls_back_then_aborts(p, a_phase, b_phase):
    c = Crash(p, a_phase=a_phase, b_phase=b_phase, b_state="absent" if b_phase == "receiving" else "paused")
    outcome = recover_b_while_a_answers(p, c.mid)
    assert outcome == f"aborted by {A_DID}: partial files and any paused copy removed here"
    assert p.b.journal.get(c.mid).phase == "discarded"
    assert p.state("vm1b") in ("shutoff", "absent") and not c.staging.exists()
    # A answered only after finishing its own side: presumed abort, the guest runs at A again
    assert phases(p.a, c.mid)[-2:] == ["aborted", "rolled-back"] and p.state("vm1") == "running"
    assert p.b.journal.get(c.mid).data["decision"] == p.a.journal.get(c.mid).data["abort_decision"]


def test_destination_undecided_with_a_unreachable_stays_paused(p):
    c = Crash(p, a_phase=None, b_phase="restored-paused")
    outcome = recover_one(p.b, p.b.journal.get(c.mid))
    assert outcome == f"{A_DID} unreachable: left as is (a paused copy never runs without its commit)"
    assert p.b.journal.get(c.mid).phase == "restored-paused"
    assert p.state("vm1b") == "paused" and c.staging.exists()


def test_destination_undecided_while_a_still_runs_it_is_pending(p):
    c = Crash(p, a_phase="streamed", b_phase="restored-paused")
    p.a.running[c.mid] = object()  # A's migsecd is still running this migration
    outcome = recover_b_while_a_answers(p, c.mid)
    assert outcome == f"{A_DID} says the migration is still in progress"
    assert p.b.journal.get(c.mid).phase == "restored-paused" and p.state("vm1b") == "paused"
    assert p.a.journal.get(c.mid).phase == "streamed" and p.state("vm1") == "paused"


def test_the_automatic_pass_at_start_recovers_and_audits_each_migration(p):
    c = Crash(p, a_phase="suspended", b_phase="receiving", b_state="absent")
    actions = auto_recover(p.a)
    p.endpoint.wait_idle()
    assert [(a["migration_id"], a["role"], a["domain"]) for a in actions] == [(c.mid, "source", "vm1")]
    assert actions[0]["outcome"].startswith("rolled back: vm1 resumed here")
    recovered = [e for e in Ledger(p.a.config.paths.ledger).entries() if e.kind == "recovered"]
    assert [(e.migration_id, e.body["automatic"], e.body["outcome"]) for e in recovered] == \
        [(c.mid, True, actions[0]["outcome"])]
    assert p.b.journal.get(c.mid).phase == "discarded" and not c.staging.exists()
    assert auto_recover(p.a) == []  # nothing left: both sides are terminal

"""``OutgoingMigration`` (A's cold flow) against libvirt's test driver and a real B in-process.

Every test runs A's real orchestrator against B's real peer endpoint (``orchestration.pair``)
and asserts on what is left: A's journal phases, the guest's state in the test driver, A's
staging directory and the ledger. The test driver refuses libvirt's paused-save flag, so A's
memory save always fails there: the flow never reaches B's receipt (test_commit_flow.py does,
through a seam for the paused save and restore; test_recovery.py has recovery's branches).
"""
from __future__ import annotations

import pytest

from migsec.audit import Ledger
from migsec.migration.jobs import MigrationAborted
from migsec.migration.source import OutgoingMigration
from migsec.errors import AuthorizationDenied, HandshakeError, MigrationFailed
from orchestration import phases


def kinds(services, mid):
    return [(e.kind, e.body.get("outcome")) for e in Ledger(services.config.paths.ledger).entries()
            if e.migration_id == mid]


def steps(p):
    return [e["message"] for e in p.events if e.get("event") == "step"]


def run(p, grant, *, abort: str | None = None):
    job = OutgoingMigration(p.a, grant, p.events.append)
    if abort:
        job.abort.request(abort)
    try:
        return job, job.run()
    finally:
        p.endpoint.wait_idle()


def test_a_refusal_in_the_handshake_leaves_the_guest_untouched(p):
    # the stock test domain asks 8 GiB; the test driver reports a few MiB free: B's capacity check refuses
    grant = p.grant("test")
    with pytest.raises(AuthorizationDenied, match="not enough free capacity there") as refused:
        run(p, grant)
    assert refused.value.decision == "Capacity"  # B's own figures stay in B's log
    mid = grant.migration_id
    assert phases(p.a, mid) == ["requested", "authorized", "aborted", "rolled-back"]
    assert p.a.journal.get(mid).data["how"] == "never stopped"
    assert p.state("test") == "running"
    assert ("mig-resp", "refused") in kinds(p.a, mid)
    assert p.b.journal.list() == []  # B kept nothing of a refused request
    assert not (p.root / "a/state/staging" / f"out-{mid}").exists()


def test_an_unreachable_peer_leaves_the_guest_untouched(p):
    p.guest("vm1")
    grant = p.grant("vm1")
    p.endpoint.close()
    with pytest.raises(MigrationFailed, match="vm1 was not touched"):
        run(p, grant)
    assert phases(p.a, grant.migration_id) == ["requested", "authorized", "aborted", "rolled-back"]
    assert p.state("vm1") == "running"


def test_a_peer_that_closes_during_the_handshake_leaves_the_guest_untouched(p):
    p.guest("vm1")
    p.endpoint.drop_after = 16  # B never gets a whole MigReq
    grant = p.grant("vm1")
    with pytest.raises(HandshakeError, match="closed the connection during the handshake"):
        run(p, grant)
    assert phases(p.a, grant.migration_id) == ["requested", "authorized", "aborted", "rolled-back"]
    assert p.state("vm1") == "running"
    assert p.b.journal.list() == []


@pytest.mark.parametrize("how", ["operator", "timeout"])
def test_an_abort_or_timeout_during_the_handshake_never_suspends(p, how):
    p.guest("vm1")
    if how == "timeout":
        p.endpoint.delay = 1.2  # a slow peer: the handshake alone outlasts --timeout 1
    grant = p.grant("vm1", **({"timeout": 1} if how == "timeout" else {}))
    with pytest.raises(MigrationFailed, match="by the operator" if how == "operator" else "--timeout") as err:
        run(p, grant, abort="aborted by the operator (test)" if how == "operator" else None)
    mid = grant.migration_id
    assert phases(p.a, mid) == ["requested", "authorized", "handshaken", "aborted", "rolled-back"]
    assert steps(p)[-1] == "rolled back: vm1 kept running at cloud-a.example"
    assert p.state("vm1") == "running"
    if how == "operator":
        assert isinstance(err.value.__cause__, MigrationAborted)
    assert ("decision", "abort") in kinds(p.a, mid)  # signed and ledgered, sent to B
    # B, waiting for the first stream, gets A's abort decision instead: it discards at once
    assert phases(p.b, mid) == ["accepted", "receiving", "discarded"]
    assert not (p.root / "b/state/staging" / f"in-{mid}").exists()
    assert not (p.root / "a/state/staging" / f"out-{mid}").exists()


@pytest.mark.parametrize("state", ["running", "paused"])
def test_a_failed_save_rolls_back_to_the_state_the_guest_had(p, state):
    # the test driver refuses the paused-save flag: libvirt's save fails while the disk streams
    p.guest("vm1", state=state)
    grant = p.grant("vm1")
    with pytest.raises(MigrationFailed, match="rolled back.*save \\(paused\\)"):
        run(p, grant)
    mid = grant.migration_id
    assert phases(p.a, mid) == ["requested", "authorized", "handshaken", "suspended", "streaming",
                                "aborted", "rolled-back"]
    entry = p.a.journal.get(mid)
    assert entry.data["was_paused"] is (state == "paused")
    how = "kept paused (as it was)" if state == "paused" else "resumed"
    assert steps(p)[-1] == f"rolled back: vm1 {how} at cloud-a.example"
    assert p.state("vm1") == state
    assert ("decision", "abort") in kinds(p.a, mid)
    assert not (p.root / "a/state/staging" / f"out-{mid}").exists()  # the partial save image is gone
    # B never restored anything: no domain of that name appeared besides A's own
    assert sorted(p.conn.list_domains()) == ["test", "vm1"]
    # B is told abort while it receives: it discards, or (when A's close wins) keeps its staged
    # part as after a connection loss, undecided, until it asks A (test_recovery.py)
    entry = p.b.journal.get(mid)
    assert entry.phase in ("receiving", "discarded") and not entry.decided


def test_a_connection_cut_while_streaming_rolls_back(p):
    # B's link is cut after 64 KiB of a 4 MiB disk; with the test driver the save has failed by
    # then, so A gives up instead of resuming (resuming needs a save that succeeds: not here)
    p.guest("vm1", disk_bytes=4 * 1024 * 1024)
    p.endpoint.drop_after = 64 * 1024
    grant = p.grant("vm1")
    with pytest.raises(MigrationFailed, match="rolled back"):
        run(p, grant)
    mid = grant.migration_id
    assert phases(p.a, mid)[-2:] == ["aborted", "rolled-back"]
    assert "suspended" in phases(p.a, mid)
    assert p.state("vm1") == "running"
    # B saw a connection loss before any decision: it keeps its staged part for a resume
    entry = p.b.journal.get(mid)
    assert entry.phase == "receiving" and not entry.decided

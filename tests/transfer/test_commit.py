"""The commit exchange: signed Receipt / Decision / Resumed between two real domain keys.

The hypervisor operations and the journal are injected; here they record calls, so the
tests can check the one rule that matters: exactly one side ever runs the VM.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

import pytest

from migsec.errors import IntegrityError, JournalError, TicketError, UnexpectedMessageError, VirtError
from migsec.protocol import NEED_DATA, Ack, Control, Decision, Resumed, token_hash
from migsec.transfer import Expected, Manifest, ManifestEntry, StreamSource, receive_streams, send_streams
from migsec.transfer.commit import (
    AWAIT_DECISION,
    AWAIT_RESUMED,
    COMMITTED,
    DISCARDED,
    DONE,
    FINISHED,
    FINISHED_PAUSED,
    IN_DOUBT,
    RELEASED,
    ROLLED_BACK,
    RUNNING,
    DestinationCommit,
    SourceCommit,
    as_control,
)
from transfer_helpers import A_DID, B_DID, MiB, Relay, Run, layers, make_sparse

MID = "mig-commit-1"
TH = os.urandom(32)  # the transcript hash of the session both machines' messages travel on


class Host:
    """Records what the state machine asked the hypervisor and the journal to do."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.log: list[str] = []
        self.fail_on = fail_on

    def journal(self, phase: str, **fields) -> None:
        if phase == self.fail_on:
            raise JournalError(f"disk full writing {phase}")
        self.log.append(f"journal:{phase}")

    def action(self, name: str):
        def run() -> None:
            if name == self.fail_on:
                raise VirtError(f"{name} failed")
            self.log.append(name)
        return run

    def count(self, name: str) -> int:
        return self.log.count(name)


def manifest(xml_digest: str = "ab" * 32) -> tuple[Manifest, bytes]:
    entries = (
        ManifestEntry(1, "domain.xml", "xml", 100, 100, xml_digest),
        ManifestEntry(2, "disk0", "disk", 1 << 30, 300 << 20, "cd" * 32, "/var/lib/images/d.img"),
    )
    m = Manifest(MID, entries)
    return m, m.to_json()


def machines(domains, a_host: Host, b_host: Host, *, b_key=None, b_transcript_hash=TH):
    a = SourceCommit(migration_id=MID, src_did=A_DID, dest_did=B_DID, key=domains.a.key,
                     peer_key=domains.b.public_key, journal=a_host.journal,
                     resume_vm=a_host.action("resume"), release_vm=a_host.action("release"), transcript_hash=TH)
    b = DestinationCommit(migration_id=MID, src_did=A_DID, dest_did=B_DID, transcript_hash=b_transcript_hash,
                          key=b_key or domains.b.key, peer_key=domains.a.public_key, journal=b_host.journal,
                          restore_paused=b_host.action("restore"), resume_vm=b_host.action("resume"),
                          discard=b_host.action("discard"))
    return a, b


def streamed(domains, a_host: Host, b_host: Host, **kw):
    """``machines`` after A sent and B verified the same streams (ready for B's restore)."""
    a, b = machines(domains, a_host, b_host, **kw)
    m, raw = manifest()
    a.streams_sent(m, raw)
    b.streams_verified(m, raw)
    return a, b


def signed_decision(key, receipt_hash: bytes) -> str:
    """A commit Decision for this migration over ``receipt_hash``, signed by ``key``."""
    return Decision(migration_id=MID, src_did=A_DID, dest_did=B_DID, decision="commit",
                    issued_at=datetime.now(timezone.utc), receipt_hash=receipt_hash).sign(key)


def test_commit_moves_the_vm_exactly_once(domains):
    ha, hb = Host(), Host()
    a, b = streamed(domains, ha, hb)
    receipt = b.restore()
    decision = a.receipt_received(receipt)
    assert a.committed and a.state == AWAIT_RESUMED
    resumed = b.decision_received(decision)
    a.resumed_received(resumed)
    assert (a.state, b.state) == (DONE, RUNNING)
    assert ha.count("resume") == 0 and ha.count("release") == 1
    assert hb.count("resume") == 1 and hb.count("discard") == 0
    # durability order: the decision is journaled before it can leave A, and B journals it
    # before running the VM
    assert ha.log.index("journal:committed") < ha.log.index("release")
    assert hb.log.index("journal:commit-received") < hb.log.index("resume")
    assert as_control("decision", decision) == {"t": "decision", "jws": decision}


def test_source_failure_before_decision_rolls_back_and_destination_discards(domains):
    ha, hb = Host(), Host()
    a, b = streamed(domains, ha, hb)
    b.restore()
    abort = a.fail("operator pressed ^C")
    assert a.state == ROLLED_BACK and ha.count("resume") == 1 and "journal:committed" not in ha.log
    assert b.decision_received(abort) is None
    assert b.state == DISCARDED and hb.count("discard") == 1 and hb.count("resume") == 0


def test_receipt_for_other_digests_aborts(domains):
    ha, hb = Host(), Host()
    a, b = machines(domains, ha, hb)
    sent, raw_sent = manifest()
    other, raw_other = manifest(xml_digest="ef" * 32)
    a.streams_sent(sent, raw_sent)
    b.streams_verified(other, raw_other)
    with pytest.raises(IntegrityError):
        a.receipt_received(b.restore())
    assert a.state == ROLLED_BACK and ha.count("resume") == 1 and not a.committed


def test_receipt_signed_by_another_key_aborts(domains):
    ha, hb = Host(), Host()
    a, b = streamed(domains, ha, hb, b_key=domains.a.key)  # B's receipt signed with the wrong key
    with pytest.raises(TicketError):
        a.receipt_received(b.restore())
    assert a.state == ROLLED_BACK and ha.count("resume") == 1


def test_a_receipt_for_another_session_aborts_once_and_b_discards(domains):
    # B's genuine receipt for the same streams, but bound to another session's transcript
    # (a replayed or relayed receipt): A refuses it as it refuses one for other digests
    ha, hb = Host(), Host()
    a, b = streamed(domains, ha, hb, b_transcript_hash=os.urandom(32))
    with pytest.raises(TicketError, match="another session"):
        a.receipt_received(b.restore())
    assert a.state == ROLLED_BACK and not a.committed and a.decision_token is None
    assert ha.count("resume") == 1 and "journal:receipt-received" not in ha.log
    abort = a.fail("the caller's rollback")
    assert abort == a.abort_token and ha.count("resume") == 1
    assert b.decision_received(abort) is None and b.state == DISCARDED


def test_a_without_the_session_s_transcript_hash_accepts_no_receipt(domains):
    ha, hb = Host(), Host()
    a, b = streamed(domains, ha, hb)
    a.transcript_hash = None
    with pytest.raises(TicketError, match="no transcript hash"):
        a.receipt_received(b.restore())
    assert a.state == ROLLED_BACK and not a.committed
    # handshaken gives it, and a resumed session's streaming replaces it: the last one counts
    ha2, hb2 = Host(), Host()
    a2, b2 = machines(domains, ha2, hb2)
    a2.transcript_hash = None
    a2.handshaken(transcript_hash=os.urandom(32), mode="cold")
    a2.streaming(attempt=1, transcript_hash=TH)
    m, raw = manifest()
    a2.streams_sent(m, raw)
    b2.streams_verified(m, raw)
    assert a2.receipt_received(b2.restore()) and a2.committed


def test_commit_not_durable_means_abort(domains):
    ha, hb = Host(fail_on="committed"), Host()
    a, b = streamed(domains, ha, hb)
    with pytest.raises(JournalError):
        a.receipt_received(b.restore())
    assert a.state == ROLLED_BACK and ha.count("resume") == 1 and a.decision_token is None


def test_destination_never_resumes_without_a_signed_commit(domains):
    ha, hb = Host(), Host()
    a, b = streamed(domains, ha, hb)
    receipt = b.restore()
    # the link breaks after the receipt left: B is in doubt, neither runs nor discards
    b.fail("connection lost")
    assert b.state == IN_DOUBT and hb.count("resume") == 0 and hb.count("discard") == 0
    # a "decision" signed by B's own key (forged) is refused
    forged = signed_decision(domains.b.key, token_hash(receipt))
    with pytest.raises(TicketError):
        b.decision_received(forged)
    # a genuine commit for a different receipt is refused too
    stale = signed_decision(domains.a.key, os.urandom(32))
    with pytest.raises(TicketError):
        b.decision_received(stale)
    assert b.state == IN_DOUBT and hb.count("resume") == 0
    # A's real decision, delivered by recovery, settles it
    b.decision_received(a.receipt_received(receipt))
    assert b.state == RUNNING and hb.count("resume") == 1 and ha.count("resume") == 0


def test_commit_before_restore_is_illegal(domains):
    ha, hb = Host(), Host()
    a, b = machines(domains, ha, hb)
    m, raw = manifest()
    b.streams_verified(m, raw)
    early = signed_decision(domains.a.key, os.urandom(32))
    with pytest.raises(UnexpectedMessageError):
        b.decision_received(early)
    assert hb.count("resume") == 0


def test_source_failure_after_commit_never_resumes_the_source(domains):
    ha, hb = Host(), Host()
    a, b = streamed(domains, ha, hb)
    decision = a.receipt_received(b.restore())
    again = a.fail("link to B broke before Resumed")
    assert again == decision and a.state == AWAIT_RESUMED and ha.count("resume") == 0
    a.resumed_received(b.decision_received(again))
    assert a.state == DONE and ha.count("release") == 1


def test_restore_failure_discards_before_any_receipt(domains):
    ha, hb = Host(), Host(fail_on="restore")
    a, b = machines(domains, ha, hb)
    m, raw = manifest()
    b.streams_verified(m, raw)
    with pytest.raises(VirtError):
        b.restore()
    assert b.state == DISCARDED and hb.count("discard") == 1 and b.receipt_token is None


def test_resumed_for_another_decision_does_not_release(domains):
    ha, hb = Host(), Host()
    a, b = streamed(domains, ha, hb)
    a.receipt_received(b.restore())
    wrong = Resumed(migration_id=MID, src_did=A_DID, dest_did=B_DID, decision_hash=os.urandom(32),
                    issued_at=datetime.now(timezone.utc)).sign(domains.b.key)
    with pytest.raises(TicketError):
        a.resumed_received(wrong)
    assert ha.count("release") == 0 and a.state == AWAIT_RESUMED


# --- the whole exchange on one keyed session, after the data plane -------------------------------
def recv_control(sock, records):
    """Next CONTROL message on the record layer's sans-IO path (ACKs are skipped)."""
    while True:
        event = records.next_event()
        if event is NEED_DATA:
            data = sock.recv(65536)
            records.receive_data(data)
            continue
        if isinstance(event, Ack):
            continue
        assert isinstance(event, Control), event
        return event.message


def test_data_plane_then_commit_on_the_same_session(tmp_path, domains, keys):
    image = make_sparse(str(tmp_path / "disk.img"), 8 * MiB, [(MiB, os.urandom(2 * MiB))])
    ha, hb = Host(), Host()
    la, lb = layers(keys)
    src_sock, dst_sock = Relay().connect()
    mid = keys.migration_id

    def source():
        a = SourceCommit(migration_id=mid, src_did=A_DID, dest_did=B_DID, key=domains.a.key,
                         peer_key=domains.b.public_key, journal=ha.journal,
                         resume_vm=ha.action("resume"), release_vm=ha.action("release"),
                         transcript_hash=keys.transcript_hash)
        sent = send_streams(src_sock, la, [StreamSource(1, "disk0", "disk", path=image)], timeout=30)
        a.streams_sent(sent.manifest, sent.manifest_json)
        msg = recv_control(src_sock, la)
        decision = a.receipt_received(msg["jws"])
        src_sock.sendall(la.send_control(0, as_control("decision", decision)))
        a.resumed_received(recv_control(src_sock, la)["jws"])
        return a.state

    def destination():
        got = receive_streams(dst_sock, lb, str(tmp_path / "stage"),
                              {"disk0": Expected("disk", str(tmp_path / "out.img"))}, timeout=30)
        got.staging.commit()
        b = DestinationCommit(migration_id=mid, src_did=A_DID, dest_did=B_DID,
                              transcript_hash=keys.transcript_hash, key=domains.b.key,
                              peer_key=domains.a.public_key, journal=hb.journal,
                              restore_paused=hb.action("restore"), resume_vm=hb.action("resume"),
                              discard=hb.action("discard"))
        b.streams_verified(got.manifest, got.manifest_json)
        dst_sock.sendall(lb.send_control(0, as_control("receipt", b.restore())))
        resumed = b.decision_received(recv_control(dst_sock, lb)["jws"])
        dst_sock.sendall(lb.send_control(0, as_control("resumed", resumed)))
        got.staging.close()
        return b.state

    side_b = Run(destination)
    side_b.start()
    assert source() == DONE
    assert side_b.value() == RUNNING
    assert (ha.count("resume"), ha.count("release"), hb.count("resume")) == (0, 1, 1)
    assert open(tmp_path / "out.img", "rb").read() == open(image, "rb").read()


# --- one decision per migration, and the machines rebuilt from a journal --------------------------
class Entry:
    """A journal entry as ``migsec.migration.journal`` returns it (what ``from_journal`` reads)."""

    def __init__(self, history, **data) -> None:
        self.migration_id, self.phase, self.data = MID, history[-1], data
        self.history = tuple((ph, float(i)) for i, ph in enumerate(history))


class Recorder(Host):
    """A Host that keeps each journal write's fields, so the journal can be rebuilt from it."""

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__(fail_on)
        self.writes: list[tuple[str, dict]] = []

    def journal(self, phase: str, **fields) -> None:
        super().journal(phase, **fields)
        self.writes.append((phase, fields))

    def entry(self, **data) -> Entry:
        merged: dict = dict(data)
        history: list[str] = []
        for phase, fields in self.writes:
            merged.update(fields)
            if not history or history[-1] != phase:
                history.append(phase)
        return Entry(history, **merged)


def source_from(domains, entry, host: Host, *, peer=True):
    return SourceCommit.from_journal(entry, src_did=A_DID, key=domains.a.key,
                                     peer_key=domains.b.public_key if peer else None, journal=host.journal,
                                     resume_vm=host.action("resume"), release_vm=host.action("release"))


def destination_from(domains, entry, host: Host, *, peer=True):
    return DestinationCommit.from_journal(entry, dest_did=B_DID, key=domains.b.key,
                                          peer_key=domains.a.public_key if peer else None, journal=host.journal,
                                          restore_paused=host.action("restore"), resume_vm=host.action("resume"),
                                          discard=host.action("discard"), cleanup=host.action("cleanup"))


def test_every_later_failure_returns_the_one_abort_decision(domains):
    ha, hb = Recorder(), Host()
    a, b = streamed(domains, ha, hb)
    b.restore()
    first = a.fail("link broke")
    assert a.fail("and again") == first and ha.count("resume") == 1  # no second resume, no second abort
    assert ("aborted", {"reason": "link broke", "abort_decision": first}) in ha.writes
    assert Decision.verify(first, domains.a.public_key, migration_id=MID).decision == "abort"
    # rebuilt from its journal (recovery, or B asking), A answers the same decision again
    again = source_from(domains, ha.entry(peer=B_DID), Host())
    assert again.state == ROLLED_BACK and again.fail("asked by B") == first


def test_a_refused_receipt_aborts_once_and_the_caller_gets_that_abort(domains):
    ha, hb = Host(), Host()
    a, b = streamed(domains, ha, hb, b_key=domains.a.key)
    with pytest.raises(TicketError):
        a.receipt_received(b.restore())
    abort = a.fail("the caller's rollback")
    assert abort == a.abort_token and ha.count("resume") == 1 and ha.log.count("journal:aborted") == 1
    assert b.decision_received(abort) is None and b.state == DISCARDED


def test_no_receipt_is_accepted_before_the_handshake_gave_the_peer_key(domains):
    ha = Host()
    a = SourceCommit(migration_id=MID, src_did=A_DID, dest_did=B_DID, key=domains.a.key, peer_key=None,
                     journal=ha.journal, resume_vm=ha.action("resume"), release_vm=ha.action("release"))
    _, hb = Host(), Host()
    _, b = machines(domains, Host(), hb)
    m, raw = manifest()
    a.authorized(domain="vm1", peer=B_DID)
    a.streams_sent(m, raw)
    b.streams_verified(m, raw)
    with pytest.raises(TicketError, match="no key"):
        a.receipt_received(b.restore())
    assert a.state == ROLLED_BACK and not a.committed
    # given by handshaken, the key makes the same exchange commit
    ha2, hb2 = Host(), Host()
    a2, b2 = machines(domains, ha2, hb2)
    a2.peer_key = None
    a2.handshaken(domains.b.public_key, mode="cold")
    a2.streams_sent(m, raw)
    b2.streams_verified(m, raw)
    assert a2.receipt_received(b2.restore()) and a2.committed
    assert ha2.log[:2] == ["journal:handshaken", "journal:streamed"]


def test_progress_events_are_journaled_only_before_the_streams_are_sent(domains):
    ha = Host()
    a, _ = machines(domains, ha, Host())
    a.authorized(domain="vm1")
    a.handshaken(mode="cold")
    a.suspended(was_paused=False)
    a.streaming(attempt=0)
    a.streaming(attempt=1)
    m, raw = manifest()
    a.streams_sent(m, raw)
    a.saved(memory_sha256="ab" * 32)
    with pytest.raises(UnexpectedMessageError):
        a.suspended(was_paused=False)
    assert ha.log == ["journal:authorized", "journal:handshaken", "journal:suspended", "journal:streaming",
                      "journal:streaming", "journal:streamed", "journal:saved"]


def test_recovery_releases_first_then_b_s_resumed_finishes_without_a_second_release(domains):
    ha, hb = Recorder(), Host()
    a, b = streamed(domains, ha, hb)
    decision = a.receipt_received(b.restore())
    # crash: A restarts from its journal ("committed"), releases, then hears B's Resumed
    ra = source_from(domains, ha.entry(peer=B_DID), ha, peer=False)
    assert ra.state == AWAIT_RESUMED and ra.committed and ra.decision_token == decision
    assert ra.fail("recovering") == decision and ha.count("resume") == 0  # A never resumes now
    ra.release()
    assert ra.state == RELEASED and ha.count("release") == 1
    resumed = b.decision_received(decision)
    with pytest.raises(TicketError, match="no key"):  # the recovery session gives the key
        ra.resumed_received(resumed)
    ra.peer_key = domains.b.public_key
    ra.resumed_received(resumed)
    assert ra.state == DONE and ha.count("release") == 1 and ha.log[-1] == "journal:done"


@pytest.mark.parametrize("history, state", [
    (["requested", "authorized", "handshaken"], "AWAIT_STREAMS"),
    (["requested", "authorized", "handshaken", "suspended", "streaming", "aborted"], "AWAIT_STREAMS"),
    (["requested", "suspended", "streaming", "streamed"], "AWAIT_RECEIPT"),
    (["requested", "streamed", "saved", "receipt-received"], "AWAIT_RECEIPT"),
    (["requested", "streamed", "receipt-received", "committed"], "AWAIT_RESUMED"),
    (["requested", "committed", "released"], "RELEASED"),
    (["requested", "committed", "released", "done"], "DONE"),
    (["requested", "aborted", "rolled-back"], "ROLLED_BACK"),
])
def test_the_source_machine_is_rebuilt_in_the_state_its_journal_says(domains, history, state):
    a = source_from(domains, Entry(history, peer=B_DID, decision="d", abort_decision="x"), Host())
    assert a.state == state and a.dest_did == B_DID
    assert a.committed is ("committed" in history)
    assert a.decision_token == ("d" if "committed" in history else None)


def test_a_source_undecided_after_a_crash_aborts_once_and_never_commits(domains):
    ha = Host()
    a = source_from(domains, Entry(["requested", "streamed", "receipt-received"], peer=B_DID), ha)
    abort = a.fail("recovered after a crash")
    assert a.state == ROLLED_BACK and ha.log == ["journal:aborted", "resume", "journal:rolled-back"]
    assert Decision.verify(abort, domains.a.public_key, migration_id=MID).decision == "abort"
    with pytest.raises(UnexpectedMessageError):
        a.receipt_received("any")  # no receipt is even looked at after the abort


@pytest.mark.parametrize("history, state", [
    (["accepted", "receiving"], "RECEIVING"),
    (["accepted", "receiving", "received"], "RECEIVED"),
    (["accepted", "receiving", "received", "restored-paused"], "IN_DOUBT"),
    (["accepted", "received", "restored-paused", "commit-received"], "COMMITTED"),
    (["accepted", "restored-paused", "commit-received", "resumed"], "RUNNING"),
    (["accepted", "commit-received", "resumed", "done"], "FINISHED"),
    (["accepted", "receiving", "discarded"], "DISCARDED"),
])
def test_the_destination_machine_is_rebuilt_in_the_state_its_journal_says(domains, history, state):
    b = destination_from(domains, Entry(history, peer=A_DID, receipt="r", decision="d"), Host())
    assert b.state == state and b.src_did == A_DID
    assert b.decision_token == ("d" if "commit-received" in history else None)


def test_b_in_doubt_after_a_crash_applies_a_s_commit_exactly_once(domains):
    ha, hb = Host(), Recorder()
    a, b = streamed(domains, ha, hb)
    decision = a.receipt_received(b.restore())
    # B crashed after its receipt: rebuilt from its journal, A's decision arrives (recovery)
    hb2 = Recorder()
    rb = destination_from(domains, hb.entry(peer=A_DID), hb2)
    assert rb.state == IN_DOUBT
    resumed = rb.decision_received(decision)
    assert rb.state == RUNNING and hb2.log == ["journal:commit-received", "resume", "journal:resumed"]
    # A sends it again (its Resumed was lost): the same Resumed, no new journal, still resumed
    assert rb.decision_received(decision) == resumed and hb2.log.count("journal:resumed") == 1
    rb.finish()
    assert rb.state == FINISHED and hb2.log[-2:] == ["cleanup", "journal:done"]
    assert rb.decision_received(decision) == resumed  # even after it finished
    a.resumed_received(resumed)
    assert a.state == DONE


def test_b_committed_before_a_crash_resumes_from_its_journal_without_asking(domains):
    ha, hb = Host(), Recorder(fail_on="resume")
    a, b = streamed(domains, ha, hb)
    decision = a.receipt_received(b.restore())
    with pytest.raises(VirtError):
        b.decision_received(decision)  # commit-received journaled, then resuming failed
    assert b.state == COMMITTED
    b.fail("resume failed")
    assert b.state == COMMITTED and hb.count("discard") == 0  # a failure never undoes a commit here
    forged_abort = Decision(migration_id=MID, src_did=A_DID, dest_did=B_DID, decision="abort",
                            issued_at=datetime.now(timezone.utc), reason="aborted: x").sign(domains.a.key)
    with pytest.raises(UnexpectedMessageError):
        b.decision_received(forged_abort)  # A never aborts after its commit; an abort then is refused
    assert hb.count("discard") == 0
    hb2 = Host()
    rb = destination_from(domains, hb.entry(peer=A_DID), hb2, peer=False)  # no session, no peer key
    assert rb.state == COMMITTED
    resumed = rb.resume()
    assert rb.state == RUNNING and hb2.log == ["resume", "journal:resumed"]
    a.resumed_received(resumed)  # the Resumed signed in recovery answers A's decision


@pytest.mark.parametrize("history", [["accepted", "receiving"], ["accepted", "receiving", "received"],
                                     ["accepted", "receiving", "received", "restored-paused"]])
def test_a_s_abort_discards_b_at_any_point_before_the_commit_and_only_once(domains, history):
    ha = Host()
    a, _ = machines(domains, ha, Host())
    abort = a.fail("crash")
    hb = Host()
    rb = destination_from(domains, Entry(history, peer=A_DID), hb)
    assert rb.decision_received(abort) is None and rb.state == DISCARDED
    assert rb.decision_received(abort) is None and hb.log == ["discard", "journal:discarded"]
    commit = signed_decision(domains.a.key, os.urandom(32))
    with pytest.raises(UnexpectedMessageError):
        rb.decision_received(commit)  # nothing commits what was discarded


def test_b_refuses_a_decision_without_a_key_to_verify_it(domains):
    hb = Host()
    rb = destination_from(domains, Entry(["accepted", "restored-paused"], peer=A_DID, receipt="r"), hb,
                          peer=False)
    with pytest.raises(TicketError, match="no key"):
        rb.decision_received(signed_decision(domains.a.key, token_hash("r")))
    assert rb.state == IN_DOUBT and hb.log == []


def test_b_journals_received_once_with_the_name_to_restore_under_and_the_restored_name_with_its_receipt(domains):
    hb = Recorder()
    _, b = machines(domains, Host(), hb)
    b._restore = lambda: {"restored": "vm1-b"}
    b.accepted(domain="vm1")
    b.receiving(attempt="migrate")
    m, raw = manifest()
    b.streams_verified(m, raw, restoring="vm1-b")  # the name, durable before the restore runs
    receipt = b.restore()
    assert [ph for ph, _ in hb.writes] == ["accepted", "receiving", "received", "restored-paused"]
    assert hb.writes[2][1]["restoring"] == "vm1-b"
    assert hb.writes[-1][1] == {"receipt": receipt, "restored": "vm1-b"}


# --- live: libvirt in the place of the data plane (migsec.migration.live) ------------------------------
LIVE = "finished-paused"
CHANNELS = {"libvirt.1.a2b": b"\x01" * 32, "libvirt.1.b2a": b"\x02" * 32, "qemu.3.a2b": b"\x03" * 32,
            "qemu.3.b2a": b"\x04" * 32, "nbd.5.a2b": b"\x05" * 32, "nbd.5.b2a": b"\x06" * 32}


def live_machines(domains, a_host: Host, b_host: Host, *, th: bytes | None = None):
    th = th or os.urandom(32)
    a = SourceCommit(migration_id=MID, src_did=A_DID, dest_did=B_DID, key=domains.a.key,
                     peer_key=domains.b.public_key, journal=a_host.journal, resume_vm=a_host.action("resume"),
                     release_vm=a_host.action("release"), receipt_state=LIVE, transcript_hash=th,
                     stopped_when_sent=True)
    b = DestinationCommit(migration_id=MID, src_did=A_DID, dest_did=B_DID, transcript_hash=th,
                          key=domains.b.key, peer_key=domains.a.public_key, journal=b_host.journal,
                          restore_paused=b_host.action("restore"), resume_vm=b_host.action("resume"),
                          discard=b_host.action("wait-dropped"), discard_on_abort=b_host.action("destroy-paused"),
                          receipt_state=LIVE)
    return a, b


def test_live_commit_runs_the_guest_only_at_b_after_the_signed_commit(domains):
    ha, hb = Host(), Host()
    a, b = live_machines(domains, ha, hb)
    early = b.finished_paused({"libvirt.1.a2b": b"\x01" * 32}, finished="libvirt (paused)")
    assert b.state == FINISHED_PAUSED and hb.log == ["journal:received"] and b.receipt_token == early
    a.digests_sent(CHANNELS)
    receipt = b.channels_verified(CHANNELS)
    assert b.state == AWAIT_DECISION and hb.count("resume") == 0
    decision = a.receipt_received(receipt)
    assert a.committed and ha.count("resume") == 0
    a.resumed_received(b.decision_received(decision))
    assert (a.state, b.state) == (DONE, RUNNING)
    assert hb.count("resume") == 1 and ha.count("resume") == 0 and ha.count("release") == 1
    assert hb.log.index("journal:commit-received") < hb.log.index("resume")


@pytest.mark.parametrize("change", ["channel", "missing", "transcript", "state"])
def test_live_receipt_that_differs_aborts_and_b_destroys_its_paused_copy(domains, change):
    ha, hb = Host(), Host()
    th = os.urandom(32)
    a, b = live_machines(domains, ha, hb, th=th)
    b.finished_paused(CHANNELS)
    a.digests_sent(CHANNELS)
    theirs = dict(CHANNELS)
    if change == "channel":
        theirs["qemu.3.a2b"] = b"\x09" * 32
    elif change == "missing":
        del theirs["nbd.5.a2b"]
    signer = DestinationCommit(migration_id=MID, src_did=A_DID, dest_did=B_DID,
                               transcript_hash=os.urandom(32) if change == "transcript" else th,
                               key=domains.b.key, peer_key=domains.a.public_key, journal=Host().journal,
                               restore_paused=Host().action("r"), resume_vm=Host().action("r"),
                               discard=Host().action("d"), receipt_state="restored-paused" if change == "state" else LIVE)
    signer.finished_paused(theirs)
    receipt = signer.channels_verified(theirs)
    # another session's receipt is refused as a cold move refuses it (a replay: TicketError)
    with pytest.raises(TicketError if change == "transcript" else IntegrityError) as err:
        a.receipt_received(receipt)
    if change in ("channel", "missing"):
        assert ("qemu.3.a2b" if change == "channel" else "nbd.5.a2b") in str(err.value)
    assert a.state == ROLLED_BACK and a.abort_token is not None and not a.committed
    assert b.decision_received(a.abort_token) is None
    assert b.state == DISCARDED and hb.count("destroy-paused") == 1 and hb.count("resume") == 0


def test_live_source_in_doubt_after_its_copy_stopped_never_resumes_it(domains):
    ha, hb = Host(), Host()
    a, b = live_machines(domains, ha, hb)
    a.digests_sent(CHANNELS)  # migrateToURI3 returned: libvirt's Confirm stopped A's copy
    assert a.fail("no receipt: the session broke") is None
    assert ha.count("resume") == 0 and "journal:aborted" not in ha.log and a.abort_token is None


def test_live_destination_after_finish_is_in_doubt_and_waits_for_a(domains):
    ha, hb = Host(), Host()
    a, b = live_machines(domains, ha, hb)
    early = b.finished_paused(CHANNELS)
    b.fail("session to A broke")
    assert b.state == IN_DOUBT and hb.count("resume") == 0 and hb.count("wait-dropped") == 0
    with pytest.raises(TicketError):  # a commit must name the receipt B journaled at libvirt's Finish
        b.decision_received(signed_decision(domains.a.key, os.urandom(32)))
    # recovery: A found its guest gone (libvirt's Confirm) and committed over B's journaled receipt
    assert b.decision_received(signed_decision(domains.a.key, token_hash(early))) is not None
    assert b.state == RUNNING and hb.count("resume") == 1


def test_live_destination_before_finish_waits_for_libvirt_to_drop_it_and_aborts_destroy(domains):
    ha, hb = Host(), Host()
    _, b = live_machines(domains, ha, hb)
    b.fail("session broke before libvirt's Finish")
    assert b.state == DISCARDED and hb.count("wait-dropped") == 1 and hb.count("destroy-paused") == 0
    _, b2 = live_machines(domains, ha, hb)
    abort = Decision(migration_id=MID, src_did=A_DID, dest_did=B_DID, decision="abort",
                     issued_at=datetime.now(timezone.utc)).sign(domains.a.key)
    assert b2.decision_received(abort) is None and b2.state == DISCARDED and hb.count("destroy-paused") == 1


# --- live recovery: the machines rebuilt from a live move's journal ---------------------------------
def test_live_source_rebuilt_commits_over_b_s_receipt_when_libvirt_moved_the_guest(domains):
    ha, hb = Recorder(), Recorder()
    a, b = live_machines(domains, ha, hb)
    a.authorized(domain="vm1", peer=B_DID, mode="live")
    early = b.finished_paused(CHANNELS, finished="libvirt (paused)")
    a.digests_sent(CHANNELS)
    assert a.fail("the session broke") is None  # in doubt: nothing decided, nothing resumed
    ra = source_from(domains, ha.entry(), ha, peer=False)
    assert ra.state == "AWAIT_RECEIPT" and ra.live and not ra.committed
    with pytest.raises(TicketError, match="no key"):  # B's receipt comes with the recovery session
        ra.moved_by_libvirt(early, how="libvirt")
    ra.peer_key = domains.b.public_key
    cold_receipt = DestinationCommit(
        migration_id=MID, src_did=A_DID, dest_did=B_DID, transcript_hash=TH, key=domains.b.key,
        peer_key=domains.a.public_key, journal=Host().journal, restore_paused=Host().action("r"),
        resume_vm=Host().action("r"), discard=Host().action("d")).finished_paused(CHANNELS)
    with pytest.raises(TicketError, match="not this finished-paused"):
        ra.moved_by_libvirt(cold_receipt, how="libvirt")
    assert not ra.committed and ha.count("resume") == 0  # a refused receipt changes nothing here
    decision = ra.moved_by_libvirt(early, how="libvirt (found by recover)")
    assert ra.committed and ("committed", {"decision": decision, "how": "libvirt (found by recover)"}) in ha.writes
    b.fail("session broke")
    rb = destination_from(domains, hb.entry(peer=A_DID, mode="live"), Host())
    assert rb.state == IN_DOUBT  # libvirt's Finish journaled "received" with a receipt
    ra.release()
    ra.peer_key = domains.b.public_key
    ra.resumed_received(rb.decision_received(decision))
    assert ra.state == DONE and ha.count("resume") == 0 and ha.count("release") == 1


def test_live_source_that_aborted_is_never_committed_by_libvirt_s_outcome(domains):
    ha, hb = Recorder(), Host()
    a, b = live_machines(domains, ha, hb)
    a.authorized(domain="vm1", peer=B_DID, mode="live")
    early = b.finished_paused(CHANNELS)
    abort = a.fail("libvirt rolled back")  # before digests_sent: an abort
    ra = source_from(domains, ha.entry(), Host())
    assert ra.state == ROLLED_BACK and ra.fail("again") == abort
    with pytest.raises(UnexpectedMessageError):
        ra.moved_by_libvirt(early, how="libvirt")
    crashed = Recorder()
    crashed.journal("authorized", domain="vm1", peer=B_DID, mode="live")
    crashed.journal("aborted", reason="x", abort_decision=abort)  # crash before rolled-back
    rc = source_from(domains, crashed.entry(), Host())
    with pytest.raises(UnexpectedMessageError, match="aborted"):
        rc.moved_by_libvirt(early, how="libvirt")
    assert not rc.committed

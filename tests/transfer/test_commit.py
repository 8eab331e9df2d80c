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
    DISCARDED,
    DONE,
    FINISHED,
    IN_DOUBT,
    ROLLED_BACK,
    RUNNING,
    DestinationCommit,
    SourceCommit,
    as_control,
)
from transfer_helpers import A_DID, B_DID, MiB, Relay, Run, layers, make_sparse

MID = "mig-commit-1"


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


def machines(domains, a_host: Host, b_host: Host, *, b_key=None):
    a = SourceCommit(migration_id=MID, src_did=A_DID, dest_did=B_DID, key=domains.a.key,
                     peer_key=domains.b.public_key, journal=a_host.journal,
                     resume_vm=a_host.action("resume"), release_vm=a_host.action("release"))
    b = DestinationCommit(migration_id=MID, src_did=A_DID, dest_did=B_DID, transcript_hash=os.urandom(32),
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
                         resume_vm=ha.action("resume"), release_vm=ha.action("release"))
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


# --- live: libvirt in the place of the data plane (migsec.daemon.live) ------------------------------
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
    assert b.state == FINISHED and hb.log == ["journal:received"] and b.receipt_token == early
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
    with pytest.raises(IntegrityError) as err:
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

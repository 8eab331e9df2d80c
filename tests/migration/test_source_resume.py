"""A's resume rule (OutgoingMigration._transfer): only a named network fault (errors.RESUMABLE)
starts a resume on a new connection; a local disk's OSError, or B's refusal, is final at once."""
from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest

from migsec.migration import dataplane, link
from migsec.migration import source as source_mod
from migsec.migration.source import OutgoingMigration
from migsec.errors import PeerClosedError, TransferError, TruncatedStreamError, network_error
from migsec.protocol.errors import peer_error_text


class Session:
    def __init__(self, name: str) -> None:
        self.name, self.bytes_on_wire, self.closed = name, 0, False
        self.keys = SimpleNamespace(transcript_hash=name.encode())  # each session its own

    def close(self) -> None:
        self.closed = True


def outgoing(tmp_path) -> OutgoingMigration:
    services = SimpleNamespace(
        config=SimpleNamespace(paths=SimpleNamespace(staging_dir=str(tmp_path)),
                               limits=SimpleNamespace(bandwidth_mib_s=0)),
        peers=SimpleNamespace(get=lambda did: SimpleNamespace(did=did, address="127.0.0.1:1")),
        did="cloud-a.example", identity=SimpleNamespace(key=None), clock=None,  # the commit machine's
    )
    request = SimpleNamespace(vm="vm1", options={}, mode="cold")
    grant = SimpleNamespace(request=request, migration_id="m-resume-1", destination_did="cloud-b.example",
                            token="tkt", max_bandwidth=None, user="alice")
    job = OutgoingMigration(services, grant, emit=lambda event: None)
    job.journaled = []
    job.journal = lambda phase, **fields: job.journaled.append((phase, fields))
    return job


@pytest.fixture
def wired(tmp_path, monkeypatch):
    """A job whose data plane raises the given errors one after the other, then succeeds."""
    job = outgoing(tmp_path)
    plan: list[BaseException] = []
    sessions: list[Session] = []
    connects: list[dict] = []

    def send(session, streams, **kw):
        sessions.append(session)
        if plan:
            raise plan.pop(0)
        return SimpleNamespace(data_bytes=1, logical_bytes=2)

    def connect(services, peer, request, token, **kw):
        connects.append(kw)
        return Session(f"resumed-{len(connects)}")

    monkeypatch.setattr(dataplane, "send", send)
    monkeypatch.setattr(dataplane, "source_streams", lambda *a: iter(()))
    monkeypatch.setattr(dataplane, "request_files", lambda request: [])
    monkeypatch.setattr(link, "connect", connect)
    monkeypatch.setattr(source_mod.time, "sleep", lambda s: None)
    saver = SimpleNamespace(failed=False)
    return SimpleNamespace(job=job, plan=plan, sessions=sessions, connects=connects,
                           run=lambda: job._transfer(Session("first"), None, saver))


def reset() -> BaseException:
    try:
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    except ConnectionResetError as exc:
        return network_error(exc, "connection to the peer failed while sending")


@pytest.mark.parametrize("fault", [reset, lambda: PeerClosedError("destination closed the connection"),
                                   lambda: TruncatedStreamError("input ended inside a frame")])
def test_a_cut_connection_resumes_on_a_new_one(wired, fault):
    wired.plan.append(fault())
    session, result = wired.run()
    assert wired.connects == [{"migration_id": "m-resume-1", "resume_of": "m-resume-1"}]
    assert session.name == "resumed-1" and wired.sessions[0].closed and result.logical_bytes == 2
    assert [p for p, _ in wired.job.journaled] == ["streaming", "streaming"]
    # B's receipt must now name the resumed session, not the first one
    assert wired.job.commit.transcript_hash == b"resumed-1"


@pytest.mark.parametrize("fault", [
    lambda: OSError(errno.ENOSPC, "No space left on device", "/var/lib/migsec/staging/out-m/x"),
    lambda: TransferError("stream 'disk0': cannot open '/var/lib/libvirt/images/vm1.qcow2': Input/output error"),
    lambda: TransferError(f"destination refused the transfer: {peer_error_text('internal')}"),
])
def test_a_local_disk_error_or_a_refusal_is_not_retried(wired, fault):
    error = fault()
    wired.plan.append(error)
    with pytest.raises(type(error)) as raised:
        wired.run()
    assert raised.value is error and wired.connects == []  # never reconnected
    assert [p for p, _ in wired.job.journaled] == ["streaming"]


def test_resuming_gives_up_after_max_resumes(wired):
    wired.plan.extend(reset() for _ in range(source_mod.MAX_RESUMES + 1))
    with pytest.raises(TransferError, match=f"lost {source_mod.MAX_RESUMES + 1} times"):
        wired.run()
    assert len(wired.connects) == source_mod.MAX_RESUMES


@pytest.mark.parametrize("reason, words", [
    ("internal: an internal error (its migsecd log has the detail)", "internal error"),
    ("integrity: data did not match its digest", "did not match its digest"),
    # an older or hostile B that still sends its detail: A renders only a code it knows
    (f"VirtError: cannot connect to /run/fake-b/libvirt/libvirt-sock", "internal error"),
])
def test_bs_abort_reaches_the_operator_in_as_words(tmp_path, reason, words):
    job = outgoing(tmp_path)
    session = SimpleNamespace(control=SimpleNamespace(recv_control=lambda timeout: {"t": "abort", "reason": reason}))
    with pytest.raises(TransferError) as aborted:
        job._expect(session, "receipt")
    message = str(aborted.value)
    assert message.startswith("cloud-b.example aborted: ") and words in message
    assert "/" not in message and "VirtError" not in message

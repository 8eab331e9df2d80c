"""The data plane end to end: real handshake keys, record layers, loopback TCP, threads."""
from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from migsec.errors import IntegrityError, RecordAuthError, StreamRefusedError, TransferError
from migsec.protocol import RecordLayer
from migsec.transfer import (
    Expected,
    Staging,
    StreamSource,
    StreamSpec,
    TokenBucket,
    receive_streams,
    send_streams,
)
from migsec.transfer.plane import PeerConnectionError
from transfer_helpers import MiB, Relay, Run, handshake, layers, make_sparse

XML = b"<domain type='qemu'><name>vm1</name></domain>"


def sha(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def sources(image: str, *, memory: str | None = None) -> list[StreamSource]:
    out = [StreamSource(1, "domain.xml", "xml", data=XML), StreamSource(2, "disk0", "disk", path=image)]
    if memory:
        out.append(StreamSource(3, "memory", "memory", path=memory))
    return out


def expected(tmp_path, *, memory: bool = False) -> dict[str, Expected]:
    out = {"domain.xml": Expected("xml", max_size=MiB), "disk0": Expected("disk", str(tmp_path / "disk0.img"))}
    if memory:
        out["memory"] = Expected("memory", max_size=64 * MiB)
    return out


def run_pair(keys, relay, srcs, staging, exp, **send_kw):
    a, b = layers(keys)
    src_sock, dst_sock = relay.connect()
    def receive():
        with dst_sock:  # like the daemon: a failed receiver drops the connection
            return receive_streams(dst_sock, b, staging, exp, ack_interval=4 * MiB, timeout=30)

    receiver = Run(receive)
    receiver.start()
    try:
        sent = send_streams(src_sock, a, srcs, timeout=30, **send_kw)
        error = None
    except Exception as exc:  # the test inspects both sides
        sent, error = None, exc
    finally:
        src_sock.close()
    receiver.join(30)
    return sent, error, receiver


def test_sparse_disk_and_memory_arrive_identical_with_few_wire_bytes(tmp_path, keys, sparse_image):
    memory = make_sparse(str(tmp_path / "mem.save"), 6 * MiB, [(0, os.urandom(5 * MiB + 3))])
    relay = Relay()
    seen = []
    sent, error, receiver = run_pair(keys, relay, sources(sparse_image, memory=memory),
                                     str(tmp_path / "stage"), expected(tmp_path, memory=True),
                                     progress=seen.append)
    assert error is None, error
    got = receiver.value()
    staging = got.staging
    staging.commit()
    target = tmp_path / "disk0.img"
    assert sha(target) == sha(sparse_image)
    assert sha(staging.by_name("memory").path) == sha(memory)
    assert staging.read_bytes(1) == XML
    # holes (and the written zero blocks) stay holes at the destination
    data = sum(e.allocated for e in sent.manifest.streams)
    disk_entry = sent.manifest.entry("disk0")
    assert os.stat(target).st_blocks * 512 <= disk_entry.allocated + 64 * 1024
    assert os.stat(target).st_blocks < os.stat(sparse_image).st_blocks
    # bytes on the wire, counted by the relay: at most 5% over the data extents
    assert relay.a_to_b <= 1.05 * data
    assert relay.a_to_b == sent.wire_bytes
    # the manifest both sides hold is the same canonical document
    assert got.manifest_json == sent.manifest_json
    assert got.manifest == sent.manifest
    assert {e.name for e in got.manifest.streams} == {"domain.xml", "disk0", "memory"}
    # progress went forward and reached the total
    assert seen and seen[-1].all_done == seen[-1].all_total == sum(s.size for s in sent.manifest.streams)
    assert all(x.all_done <= y.all_done for x, y in zip(seen, seen[1:]))
    staging.close()
    relay.close()


def test_cut_connection_resumes_from_acknowledged_offset(tmp_path, domains, sparse_image):
    big = make_sparse(str(tmp_path / "big.img"), 48 * MiB, [(0, os.urandom(40 * MiB))])
    stage = str(tmp_path / "stage")
    keys1 = handshake(domains)
    relay = Relay(cut_after=20 * MiB)
    sent, error, receiver = run_pair(keys1, relay, sources(big), stage, expected(tmp_path))
    assert isinstance(error, TransferError)
    with pytest.raises(PeerConnectionError):
        receiver.value()
    assert os.path.exists(os.path.join(stage, "state.json"))
    assert not (tmp_path / "disk0.img").exists()

    keys2 = handshake(domains, resume_of=keys1.migration_id)
    relay2 = Relay()
    # the same migration id names the resumed transfer in the manifest
    sent2, error2, receiver2 = run_pair(keys2, relay2, sources(big), stage, expected(tmp_path))
    assert error2 is None, error2
    got = receiver2.value()
    resumed_at = got.resumed_from["disk0"]
    assert 8 * MiB <= resumed_at <= 20 * MiB
    assert relay2.a_to_b < 40 * MiB - resumed_at + MiB  # only the rest travelled again
    got.staging.commit()
    got.staging.close()
    assert sha(tmp_path / "disk0.img") == sha(big)


def test_tampered_record_is_refused_and_nothing_is_installed(tmp_path, keys, sparse_image):
    relay = Relay(flip_at=3 * MiB + 100)
    sent, error, receiver = run_pair(keys, relay, sources(sparse_image), str(tmp_path / "stage"),
                                     expected(tmp_path))
    assert isinstance(error, TransferError)
    with pytest.raises(RecordAuthError):
        receiver.value()
    assert not (tmp_path / "disk0.img").exists()


def test_source_changed_after_hashing_fails_integrity_on_both_sides(tmp_path, keys):
    image = make_sparse(str(tmp_path / "src.img"), 8 * MiB, [(0, os.urandom(4 * MiB))])
    srcs = sources(image)
    srcs[1].digest()  # the digest of the original content is now fixed
    with open(image, "r+b") as fh:
        fh.seek(MiB)
        fh.write(b"changed")
    relay = Relay()
    sent, error, receiver = run_pair(keys, relay, srcs, str(tmp_path / "stage"), expected(tmp_path))
    # the source learns the code (integrity), in its own words; the detail stays with the receiver
    assert isinstance(error, IntegrityError) and "did not match its digest" in str(error)
    assert "disk0" not in str(error)
    with pytest.raises(IntegrityError, match="disk0"):
        receiver.value()


def test_unexpected_stream_is_refused_with_a_reason(tmp_path, keys, sparse_image):
    relay = Relay()
    exp = {"domain.xml": Expected("xml")}
    sent, error, receiver = run_pair(keys, relay, sources(sparse_image), str(tmp_path / "stage"), exp)
    assert isinstance(error, TransferError) and "not acceptable" in str(error)
    assert "disk0" not in str(error)  # the receiver's reason is its own (it names the stream)
    with pytest.raises(StreamRefusedError, match="'disk0' was not expected"):
        receiver.value()


def test_oversized_stream_is_refused(tmp_path, keys, sparse_image):
    relay = Relay()
    exp = expected(tmp_path)
    exp["disk0"] = Expected("disk", str(tmp_path / "d.img"), max_size=MiB)
    sent, error, receiver = run_pair(keys, relay, sources(sparse_image), str(tmp_path / "stage"), exp)
    assert isinstance(error, TransferError) and "not acceptable" in str(error)
    with pytest.raises(StreamRefusedError, match="size"):
        receiver.value()


def test_memory_stream_can_join_later(tmp_path, keys, sparse_image):
    """Disks go first while the memory image is still being written; it joins when ready."""
    memory = str(tmp_path / "mem.save")
    saved = threading.Event()

    def saver():
        make_sparse(memory, 2 * MiB, [(0, os.urandom(2 * MiB))])
        saved.set()

    def lazy():
        yield from sources(sparse_image)
        threading.Thread(target=saver).start()
        saved.wait(10)
        yield StreamSource(3, "memory", "memory", path=memory)

    relay = Relay()
    sent, error, receiver = run_pair(keys, relay, lazy(), str(tmp_path / "stage"),
                                     expected(tmp_path, memory=True))
    assert error is None, error
    got = receiver.value()
    assert sha(got.staging.by_name("memory").path) == sha(memory)
    got.staging.discard()
    assert not (tmp_path / "disk0.img").exists()


def test_slow_memory_save_does_not_trip_the_idle_timeout(tmp_path, keys, sparse_image):
    """Both sides time out after 1.5 s of silence; the save takes 3 s; keepalives bridge it."""
    memory = make_sparse(str(tmp_path / "mem.save"), MiB, [(0, os.urandom(MiB))])

    def lazy():
        yield from sources(sparse_image)
        time.sleep(3.0)  # stands for virDomainSave of a large guest
        yield StreamSource(3, "memory", "memory", path=memory)

    a, b = layers(keys)
    src_sock, dst_sock = Relay().connect()
    receiver = Run(receive_streams, dst_sock, b, str(tmp_path / "stage"), expected(tmp_path, memory=True),
                   timeout=1.5)
    receiver.start()
    send_streams(src_sock, a, lazy(), timeout=1.5)
    got = receiver.value()
    assert sha(got.staging.by_name("memory").path) == sha(memory)
    got.staging.discard()


def test_wrong_keys_fail_authentication(tmp_path, domains, sparse_image):
    keys_a, keys_b = handshake(domains), handshake(domains)
    a = RecordLayer(keys_a, "source")
    b = RecordLayer(keys_b, "destination")
    relay = Relay()
    src_sock, dst_sock = relay.connect()
    receiver = Run(receive_streams, dst_sock, b, str(tmp_path / "stage"), expected(tmp_path), timeout=10)
    receiver.start()
    with pytest.raises(RecordAuthError):  # B's first record (its resume offsets) does not open
        send_streams(src_sock, a, sources(sparse_image), timeout=10)
    src_sock.close()
    with pytest.raises(PeerConnectionError):
        receiver.value()
    dst_sock.close()


def test_token_bucket_paces_to_the_rate():
    now = [0.0]
    slept = []

    def sleep(t):
        slept.append(t)
        now[0] += t

    bucket = TokenBucket(10 * MiB, clock=lambda: now[0], sleep=sleep)
    for _ in range(50):
        bucket.take(MiB)
    # after the initial burst, 50 MiB at 10 MiB/s means waiting for every byte beyond it
    assert bucket.burst < 2 * MiB
    assert sum(slept) == pytest.approx((50 * MiB - bucket.burst) / (10 * MiB))
    with pytest.raises(TransferError):
        TokenBucket(0)


def test_empty_stream_and_stream_fully_acked_before_a_crash(tmp_path, keys):
    """A 0-byte stream travels as OPEN+END; a stream whose data was all acknowledged but whose
    END never arrived (B crashed) is finished on resume by an END alone, and still verified."""
    image = make_sparse(str(tmp_path / "src.img"), 4 * MiB, [(0, os.urandom(4 * MiB))])
    empty = str(tmp_path / "empty.img")
    open(empty, "wb").close()
    stage = str(tmp_path / "stage")
    exp = expected(tmp_path) | {"empty": Expected("disk", str(tmp_path / "empty-out.img"))}
    srcs = sources(image) + [StreamSource(3, "empty", "disk", path=empty)]
    # B's state before the crash: all of disk0 written and acknowledged, no END yet
    disk = srcs[1]
    staging = Staging.open(stage, [StreamSpec(2, "disk0", "disk", disk.size, exp["disk0"].target)])
    for kind, off, length, view in disk.pieces(0):
        staging.sink(2).write(off, view) if kind == "data" else staging.sink(2).hole(off, length)
    assert staging.checkpoint()["disk0"] == disk.size
    staging.sink(2).close()

    relay = Relay()
    sent, error, receiver = run_pair(keys, relay, srcs, stage, exp)
    assert error is None, error
    got = receiver.value()
    assert got.resumed_from == {"disk0": 4 * MiB}
    assert relay.a_to_b < 64 * 1024  # no data travelled again
    got.staging.commit()
    assert sha(tmp_path / "disk0.img") == sha(image)
    assert os.path.getsize(tmp_path / "empty-out.img") == 0
    got.staging.close()

"""A file still being written is streamed as it grows (libvirt's save image, DESIGN §3.3)."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from migsec.errors import TransferError
from migsec.transfer import Expected, StreamSource, file_digest, receive_streams, send_streams
from migsec.transfer.source import GrowingFileSource, WriterOutcome
from transfer_helpers import MiB, Relay, Run, handshake, layers

BLOCK_SIZE = 64 * 1024

PART, FINAL = b"LibvirtQemudPart", b"LibvirtQemudSave"
XML = b"<domain type='qemu'><name>vm1</name></domain>"


class Writer(threading.Thread, WriterOutcome):
    """Writes a save-image-like file front to back, then rewrites its magic (as libvirt does).

    ``gate(written)`` is called after each chunk and may block (to hold the writer until the
    destination has received part of the file); ``fail_after`` chunks it stops with an error.
    """

    def __init__(self, path, chunks, *, gate=None, fail_after=None, final_head=FINAL, linger=None) -> None:
        super().__init__(daemon=True)
        self.path, self.chunks, self.gate = path, chunks, gate
        self.fail_after, self.final_head = fail_after, final_head
        self.linger = linger  # runs after the head rewrite (libvirt stops QEMU then)
        WriterOutcome.__init__(self)

    def run(self) -> None:
        self.record(self._write)

    def _write(self) -> None:
        with open(self.path, "wb") as fh:
            fh.write(PART + os.urandom(4080))  # magic + the rest of the header and the XML
            fh.flush()
            for i, chunk in enumerate(self.chunks):
                if self.fail_after is not None and i == self.fail_after:
                    raise OSError("No space left on device")
                fh.write(chunk)
                fh.flush()
                if self.gate is not None:
                    self.gate(fh.tell())
            fh.seek(0)
            fh.write(self.final_head)
        if self.linger is not None:
            self.linger()


def chunks() -> list[bytes]:
    # random data, zero runs (sent as holes), and an unaligned end
    return [os.urandom(3 * MiB), bytes(2 * MiB), os.urandom(MiB + 12345), bytes(70_000), os.urandom(777)]


def growing(path, writer, **kw) -> GrowingFileSource:
    return GrowingFileSource(3, "memory", "memory", path, writer=writer, max_size=64 * MiB,
                             head=(PART, FINAL), **kw)


def collect(src: GrowingFileSource) -> bytes:
    out = bytearray()
    for kind, off, length, view in src.pieces(0):
        if kind == "wait":
            continue
        assert off == len(out)
        out += bytes(view) if kind == "data" else bytes(length)
    return bytes(out)


def test_pieces_and_digest_are_those_of_the_final_file(tmp_path):
    path = tmp_path / "mem.save"
    seen_part = threading.Event()

    def gate(written: int) -> None:
        # the follower must see the file while it still carries the partial magic
        with open(path, "rb") as fh:
            if fh.read(16) == PART:
                seen_part.set()
        time.sleep(0.02)

    writer = Writer(path, chunks(), gate=gate)
    src = growing(path, writer)
    src.start_digest()
    writer.start()
    body = collect(src)
    assert seen_part.is_set()
    final = path.read_bytes()
    assert final[:16] == FINAL
    assert body == final
    assert src.size == len(final) and not src.spec.growing
    assert src.digest()[0] == file_digest(path)


def test_failed_writer_fails_the_stream(tmp_path):
    path = tmp_path / "mem.save"
    writer = Writer(path, chunks(), fail_after=2)
    src = growing(path, writer)
    writer.start()
    with pytest.raises(TransferError, match="No space left"):
        collect(src)
    with pytest.raises(TransferError, match="No space left"):
        src.digest()


def test_unannounced_change_of_the_head_fails_the_stream(tmp_path):
    path = tmp_path / "mem.save"
    # one more byte than announced changes; the writer finishes only after the head was hashed
    src = None
    writer = Writer(path, chunks(), final_head=FINAL + b"X",
                    gate=lambda n: wait_for(lambda: src is not None and src.hashed > 0))
    src = growing(path, writer)
    src.start_digest()
    writer.start()
    with pytest.raises(TransferError, match="changed the head"):
        src.digest()


def test_a_file_that_does_not_start_as_announced_is_refused(tmp_path):
    path = tmp_path / "mem.save"
    release = threading.Event()
    writer = Writer(path, chunks(), gate=lambda n: release.wait(30))  # held while the file says Part
    src = GrowingFileSource(3, "memory", "memory", path, writer=writer, max_size=64 * MiB,
                            head=(b"SomethingElse123", FINAL))
    writer.start()
    with pytest.raises(TransferError, match="expected"):
        collect(src)
    release.set()


def test_file_growing_past_its_bound_is_refused(tmp_path):
    path = tmp_path / "mem.save"
    writer = Writer(path, chunks())
    src = GrowingFileSource(3, "memory", "memory", path, writer=writer, max_size=2 * MiB, head=(PART, FINAL))
    writer.start()
    with pytest.raises(TransferError, match="grew past"):
        collect(src)


# ---- over the data plane ---------------------------------------------------------------------------
def acked(stage, name: str) -> int:
    try:
        with open(os.path.join(stage, "state.json")) as fh:
            streams = json.load(fh)["streams"]
    except (OSError, ValueError, KeyError):
        return 0
    return max((s["acked"] for s in streams.values() if s["name"] == name), default=0)


def wait_for(cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def plane(keys, relay, srcs, stage, tmp_path):
    a, b = layers(keys)
    src_sock, dst_sock = relay.connect()
    exp = {"domain.xml": Expected("xml", max_size=MiB), "memory": Expected("memory", max_size=64 * MiB)}

    def receive():
        with dst_sock:
            return receive_streams(dst_sock, b, stage, exp, ack_interval=MiB, timeout=30)

    receiver = Run(receive)
    receiver.start()
    try:
        return send_streams(src_sock, a, srcs, timeout=30), None, receiver
    except Exception as exc:  # the test inspects both sides
        return None, exc, receiver
    finally:
        src_sock.close()


def test_destination_holds_the_final_file_and_received_it_while_it_was_written(tmp_path, keys):
    path, stage = tmp_path / "mem.save", str(tmp_path / "stage")
    # the writer waits, mid-file, until the destination acknowledged 2 MiB of the image
    writer = Writer(path, chunks(), gate=lambda n: n > 3 * MiB and wait_for(lambda: acked(stage, "memory") >= 2 * MiB))
    writer.start()
    sent, error, receiver = plane(keys, Relay(), [StreamSource(1, "domain.xml", "xml", data=XML),
                                                  growing(path, writer)], stage, tmp_path)
    assert error is None, error
    got = receiver.value()
    memory = got.staging.by_name("memory")
    with open(memory.path, "rb") as fh:
        assert fh.read() == path.read_bytes()  # magic included, cut to the final size
    assert got.manifest.entry("memory").digest == file_digest(path) == file_digest(memory.path)
    assert got.manifest.entry("memory").size == os.path.getsize(path)
    got.staging.close()


def test_failed_save_leaves_no_verified_stream_and_the_destination_can_discard(tmp_path, keys):
    from migsec.transfer import Staging

    path, stage = tmp_path / "mem.save", str(tmp_path / "stage")
    writer = Writer(path, chunks(), fail_after=3,
                    gate=lambda n: n > 3 * MiB and wait_for(lambda: acked(stage, "memory") >= 2 * MiB))
    writer.start()
    sent, error, receiver = plane(keys, Relay(), [StreamSource(1, "domain.xml", "xml", data=XML),
                                                  growing(path, writer)], stage, tmp_path)
    assert isinstance(error, TransferError) and "No space left" in str(error)
    with pytest.raises(TransferError):
        receiver.value()
    staging = Staging.open(stage)
    assert not staging.by_name("memory").done  # never ENDed, so never restorable
    staging.discard()
    assert not os.path.exists(stage)


def test_cut_while_growing_resumes_from_the_acknowledged_offset(tmp_path, domains):
    path, stage = tmp_path / "mem.save", str(tmp_path / "stage")
    release = threading.Event()
    data = [os.urandom(6 * MiB), os.urandom(6 * MiB), bytes(MiB), os.urandom(5000)]
    # the writer stays mid-file until the first connection was cut
    writer = Writer(path, data, gate=lambda n: n > 6 * MiB and release.wait(30))
    writer.start()
    keys1 = handshake(domains)
    xml = StreamSource(1, "domain.xml", "xml", data=XML)
    sent, error, receiver = plane(keys1, Relay(cut_after=4 * MiB), [xml, growing(path, writer)], stage, tmp_path)
    assert isinstance(error, TransferError)
    with pytest.raises(TransferError):
        receiver.value()
    first = acked(stage, "memory")
    assert 0 < first < 6 * MiB and not writer.finished()
    release.set()
    keys2 = handshake(domains, resume_of=keys1.migration_id)
    relay2 = Relay()
    sent, error, receiver = plane(keys2, relay2, [xml, growing(path, writer)], stage, tmp_path)
    assert error is None, error
    got = receiver.value()
    assert got.resumed_from["memory"] == first
    assert relay2.a_to_b < os.path.getsize(path) - first + MiB  # only the rest travelled again
    with open(got.staging.by_name("memory").path, "rb") as fh:
        assert fh.read() == path.read_bytes()
    got.staging.close()


def test_resume_after_the_writer_finished_still_matches_the_staged_growing_stream(tmp_path, domains):
    path, stage = tmp_path / "mem.save", str(tmp_path / "stage")
    release = threading.Event()
    writer = Writer(path, [os.urandom(6 * MiB), os.urandom(2 * MiB)], gate=lambda n: n > 6 * MiB and release.wait(30))
    writer.start()
    keys1 = handshake(domains)
    xml = StreamSource(1, "domain.xml", "xml", data=XML)
    sent, error, receiver = plane(keys1, Relay(cut_after=3 * MiB), [xml, growing(path, writer)], stage, tmp_path)
    assert isinstance(error, TransferError)
    with pytest.raises(TransferError):
        receiver.value()
    release.set()
    writer.join(30)
    src = growing(path, writer)
    src.digest()  # the whole final file is known before the resumed session opens the stream
    sent, error, receiver = plane(handshake(domains, resume_of=keys1.migration_id), Relay(),
                                  [xml, src], stage, tmp_path)
    assert error is None, error
    got = receiver.value()
    with open(got.staging.by_name("memory").path, "rb") as fh:
        assert fh.read() == path.read_bytes()
    got.staging.close()


def test_complete_once_the_head_is_final_even_before_the_writer_returns(tmp_path):
    path = tmp_path / "mem.save"
    collected = threading.Event()
    src = None
    # mid-file the writer waits until the follower has read the block with the partial magic
    writer = Writer(path, chunks(), linger=lambda: collected.wait(30),
                    gate=lambda n: wait_for(lambda: src is not None and src.hashed > 0))
    src = growing(path, writer, complete_on_final_head=True)
    src.start_digest()
    writer.start()
    body = collect(src)
    assert not writer.finished()  # still "stopping QEMU"
    assert src.digest()[0] == file_digest(path)
    collected.set()
    writer.join(30)
    assert body == path.read_bytes()


def test_without_the_option_the_stream_waits_for_the_writer(tmp_path):
    path = tmp_path / "mem.save"
    release = threading.Event()
    writer = Writer(path, chunks(), linger=lambda: release.wait(30))
    src = growing(path, writer)
    writer.start()
    waits_after_head = 0
    for kind, off, length, view in src.pieces(0):
        if kind == "wait" and path.read_bytes()[:16] == FINAL:
            waits_after_head += 1
            release.set()
    assert waits_after_head > 0 and writer.finished()


def test_a_head_that_is_final_from_the_start_does_not_end_the_stream_early(tmp_path):
    path = tmp_path / "mem.save"
    release = threading.Event()
    with open(path, "wb") as fh:  # a writer that puts the final magic first, then appends
        fh.write(FINAL + os.urandom(BLOCK_SIZE - 16))
    done = threading.Event()

    class Appender:
        def finished(self) -> bool:
            return done.is_set()

        def error(self):
            return None

    def append() -> None:
        release.wait(30)
        with open(path, "ab") as fh:
            fh.write(os.urandom(MiB))
        done.set()

    threading.Thread(target=append, daemon=True).start()
    src = growing(path, Appender(), complete_on_final_head=True)
    size = 0
    for kind, off, length, view in src.pieces(0):
        size = max(size, off + length)
        if kind == "wait":
            release.set()
    assert size == os.path.getsize(path) == BLOCK_SIZE + MiB

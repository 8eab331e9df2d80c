"""The data plane: streams over the record layer on a blocking socket (run it in a thread).

Session on the wire (channel 0 carries control, ``MANIFEST_CHANNEL`` the manifest)::

    B -> A  CONTROL(0, {"type": "resume", "offsets": {name: offset}, "done": [name]})
            (B's staging is authoritative; verified streams are not sent again)
    A -> B  per stream: CONTROL(ch, {"type": "open", name, kind, size, start}),
            DATA/HOLE extents from ``start``, END(ch, size, stream digest)
    B -> A  ACK(ch, offset) every ``ack_interval`` bytes (after fdatasync) and after END
            (after the digest of the written file matched)
    A -> B  the manifest as a stream on MANIFEST_CHANNEL; B checks it against what it verified
    B -> A  ACK(MANIFEST_CHANNEL, size); on any failure B sends CONTROL(0, {"type": "error"})
    A -> B  at any point, if A gives up: CONTROL(0, {"t": "decision", "jws": ...}), A's signed
            abort (``migsec.transfer.commit``); B stops receiving and raises SourceDecision

The sender never buffers: on resume it re-reads the file from B's offset. Hashing runs
in background threads (hashlib releases the GIL); sealing and I/O stay in the calling
thread with reused buffers (cryptography's AESGCM holds the GIL, FACTS.md).
"""
from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

from migsec.errors import (
    IntegrityError,
    MigsecError,
    NetworkError,
    PeerClosedError,
    PeerTimeoutError,
    ProtocolError,
    ResumeError,
    StreamRefusedError,
    TransferError,
    UnexpectedMessageError,
    network_error,
)
from migsec.protocol import NEED_DATA, Ack, Close, Control, Data, End, Hole, RecordLayer
from migsec.protocol.errors import parse_peer_reason, peer_error_code, peer_error_text
from migsec.protocol.framing import HEADER_SIZE, RECORD, RECORD_MAX, parse_header
from migsec.protocol.records import CONTROL_CHANNEL, OVERHEAD
from migsec.transfer.extents import READ_SIZE, bytes_digest
from migsec.transfer.manifest import Manifest, ManifestEntry
from migsec.transfer.sink import Staging
from migsec.transfer.source import KINDS, Source, StreamSpec

log = logging.getLogger(__name__)

MANIFEST_CHANNEL = 0xFFFF
ACK_INTERVAL = 16 * 1024 * 1024
MAX_MANIFEST = 16 * 1024 * 1024
MiB = 1024 * 1024
RING = 6  # decrypted records in flight between the reader and the writer thread
POLL_EVERY = 8 * MiB  # the sender looks for ACKs and errors this often
MAX_HASH_LAG = 256 * MiB  # how far sending/writing may run ahead of SHA-256 on either side
KEEPALIVE = 5.0  # at most this many seconds between keepalives while a source is not ready


@dataclass(frozen=True)
class Progress:
    """Logical bytes covered (data + holes) of one stream and of all streams so far."""

    stream: str
    done: int
    total: int
    all_done: int
    all_total: int
    wire_bytes: int


@dataclass(frozen=True)
class Expected:
    """What the destination accepts for a stream name: kind, its own target path, size bounds."""

    kind: str
    target: str = ""
    size: int | None = None
    max_size: int | None = None


@dataclass
class SendResult:
    manifest: Manifest
    manifest_json: bytes
    wire_bytes: int = 0
    logical_bytes: int = 0
    data_bytes: int = 0


@dataclass
class ReceiveResult:
    manifest: Manifest
    manifest_json: bytes
    staging: Staging
    wire_bytes: int = 0
    resumed_from: dict[str, int] = field(default_factory=dict)


class TokenBucket:
    """Bandwidth limit in bytes/s with a burst of a tenth of a second (at least one record),
    so that even a short transfer keeps close to the limit an operator asked for."""

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise TransferError(f"bandwidth limit must be positive, got {rate}")
        self.rate = rate
        self.burst = max(rate / 10, float(MiB + OVERHEAD))
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._last = clock()

    def take(self, n: int) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            self._sleep(-self._tokens / self.rate)


# the connection to the peer broke (reset, closed, timed out); the transfer can resume
PeerConnectionError = NetworkError


class SourceDecision(TransferError):
    """The source sent its signed decision (an abort: it gave up) while the streams flowed.
    ``token`` is the Decision's compact JWS, not verified here: the commit machine checks it."""

    def __init__(self, token: str) -> None:
        super().__init__("the source sent its decision during the transfer")
        self.token = token


def _decision(ev: object) -> str | None:
    """The token of a commit-layer decision on channel 0 (``commit.as_control``), else None."""
    if isinstance(ev, Control) and ev.channel == CONTROL_CHANNEL and ev.message.get("t") == "decision":
        token = ev.message.get("jws")
        if isinstance(token, str):
            return token
    return None


def linger(sock: socket.socket, seconds: float = 2.0) -> None:
    """Half-close and drain: closing with unread data would reset the connection and
    destroy the message just sent before the peer could read it."""
    deadline = time.monotonic() + seconds
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(1024 * 1024):
                return
    except OSError:
        return


class _Wire:
    """A blocking socket with byte counting and exact reads; OSError -> NetworkError."""

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self.sent = 0
        self.received = 0
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def send(self, data: bytes | memoryview) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise network_error(exc, "connection to the peer failed while sending") from exc
        self.sent += len(data)

    def readable(self, timeout: float = 0.0) -> bool:
        return bool(self._poll.poll(int(timeout * 1000)))

    def recv_some(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except OSError as exc:
            raise network_error(exc, "connection to the peer failed while receiving") from exc
        self.received += len(data)
        return data

    def linger(self, seconds: float = 2.0) -> None:
        linger(self.sock, seconds)

    def recv_exact(self, view: memoryview) -> None:
        pos, n = 0, len(view)
        while pos < n:
            try:
                got = self.sock.recv_into(view[pos:], n - pos)
            except OSError as exc:
                raise network_error(exc, "connection to the peer failed while receiving") from exc
            if got == 0:
                raise PeerClosedError(f"connection ended mid-transfer ({pos} of {n} bytes of a frame)")
            pos += got
        self.received += n


def _peer_error(msg: dict) -> MigsecError:
    """The error for a peer's CONTROL error: its code, in this side's own words (its text is ignored)."""
    code = parse_peer_reason(msg.get("error"))
    text = peer_error_text(code)
    if code == "integrity":
        return IntegrityError(f"destination: {text}")
    if code == "resume":
        return ResumeError(f"destination: {text}")
    return TransferError(f"destination refused the transfer: {text}")


class _Sender:
    def __init__(self, sock: socket.socket, records: RecordLayer, *, bandwidth_limit: float | None,
                 progress: Callable[[Progress], None] | None, timeout: float | None) -> None:
        self.wire = _Wire(sock, timeout)
        self.records = records
        self.bucket = TokenBucket(bandwidth_limit * MiB) if bandwidth_limit else None
        self.progress = progress
        self.timeout = timeout
        self.out = bytearray(READ_SIZE + OVERHEAD)
        self.buf = bytearray(READ_SIZE)
        self.resume: dict[str, int] | None = None
        self.done: set[str] = set()  # streams the destination already verified
        self.all_done = 0
        self.all_total = 0
        self.data_bytes = 0
        self.since_poll = 0
        self.keepalive = min(KEEPALIVE, (timeout or KEEPALIVE * 4) / 4)
        self.last_keepalive = time.monotonic()
        self._last_progress = 0.0

    def send(self, frame: bytes | memoryview) -> None:
        if self.bucket is not None:
            self.bucket.take(len(frame))
        self.wire.send(frame)

    def handle(self, event: object) -> None:
        if isinstance(event, Control):
            kind = event.message.get("type")
            if kind == "resume" and self.resume is None:
                offsets, done = event.message.get("offsets"), event.message.get("done")
                if not isinstance(offsets, dict) or not all(
                        isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in offsets.items()) \
                        or not isinstance(done, list) or not all(isinstance(n, str) for n in done):
                    raise ProtocolError("resume offsets from the destination are malformed")
                self.resume, self.done = offsets, set(done)
            elif kind == "error":
                raise _peer_error(event.message)
            else:
                raise UnexpectedMessageError(f"unexpected control message {kind!r} from the destination")
        elif isinstance(event, Close):
            raise TransferError("destination closed the session before the transfer ended")
        elif not isinstance(event, Ack):
            raise UnexpectedMessageError(f"unexpected {type(event).__name__} from the destination")

    def pump(self, wait: float = 0.0, until: Callable[[], bool] | None = None) -> None:
        """Process what the peer sent; wait up to ``wait`` seconds for something. Once
        ``until()`` holds, later events stay in the record layer for the caller (commit)."""
        if not self.wire.readable(wait):
            if wait:
                raise PeerTimeoutError(f"destination silent for {wait:.0f} s")
            return
        data = self.wire.recv_some()
        if not data:  # every complete record before it was handled already
            raise PeerClosedError("destination closed the connection")
        self.records.receive_data(data)
        while not (until is not None and until()) and (event := self.records.next_event()) is not NEED_DATA:
            self.handle(event)

    def report(self, name: str, done: int, total: int, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if force or now - self._last_progress >= 0.1:
            self._last_progress = now
            self.progress(Progress(name, done, total, self.all_done, self.all_total, self.wire.sent))

    def send_stream(self, src: Source, start: int) -> None:
        ch, records, out = src.channel, self.records, self.out
        opening = {"type": "open", "name": src.name, "kind": src.spec.kind, "size": src.size,
                   "start": start}
        if src.growing:  # always opened so, even if its writer finished already: resume must match
            opening.update(size=src.bound, growing=True)  # size is a bound; END gives the real one
        self.send(records.send_control(ch, opening))
        for kind, off, length, view in src.pieces(start, self.buf):
            if kind == "wait":  # the file's writer is behind: keep the session alive meanwhile
                self.idle()
                continue
            if kind == "data":
                assert view is not None  # every data piece has its view
                n = records.seal_data_into(ch, off, view, out)
                self.send(memoryview(out)[:n])
                self.data_bytes += length
            else:
                self.send(records.send_hole(ch, off, length))
            self.all_done += length
            self.since_poll += length
            if self.since_poll >= POLL_EVERY:
                self.since_poll = 0
                self.pump()
                self.report(src.name, off + length, src.size)
                self.hold_for_hash(src, off + length)

    def idle(self) -> None:
        """Between records while a source waits for data: keepalives, ACKs and peer errors."""
        now = time.monotonic()
        if now - self.last_keepalive >= self.keepalive:
            self.last_keepalive = now
            self.send(self.records.send_control(CONTROL_CHANNEL, {"type": "keepalive"}))
        self.pump()

    def hold_for_hash(self, src: Source, sent: int) -> None:
        """Keep the background hash within MAX_HASH_LAG of what was sent: SHA-256 may be slower
        than the link, and a long wait for the digest at END would look like a dead peer."""
        last = time.monotonic()
        while sent - src.hashed > MAX_HASH_LAG and not src.digest_ready:
            time.sleep(0.005)
            if time.monotonic() - last > self.keepalive:
                last = time.monotonic()
                self.send(self.records.send_control(CONTROL_CHANNEL, {"type": "keepalive"}))
                self.pump()

    def end_stream(self, src: Source) -> ManifestEntry:
        self.hold_for_hash(src, src.size + MAX_HASH_LAG)  # i.e. until the digest is ready
        entry = _entry(src)
        self.send(self.records.send_end(src.channel, src.size, bytes.fromhex(entry.digest)))
        return entry

    def wait_acked(self, targets: Mapping[int, int]) -> None:
        deadline = time.monotonic() + (self.timeout or 3600.0)

        def all_acked() -> bool:
            return all(self.records.acked(ch) >= size for ch, size in targets.items())

        while not all_acked():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferError("destination did not acknowledge the streams in time")
            self.pump(wait=left, until=all_acked)


def send_streams(sock: socket.socket, records: RecordLayer, sources: Iterable[Source], *,
                 bandwidth_limit: float | None = None,
                 progress: Callable[[Progress], None] | None = None,
                 timeout: float | None = 60.0) -> SendResult:
    """Send every source (iterated lazily, so a memory image can join when saved) and the manifest.

    Resume offsets come from the destination's staging state. ``bandwidth_limit`` is in
    MiB/s of wire bytes. Returns when the destination acknowledged everything, i.e. wrote,
    fsynced and verified the digest of every stream and checked the manifest.
    """
    s = _Sender(sock, records, bandwidth_limit=bandwidth_limit, progress=progress, timeout=timeout)
    while s.resume is None:
        s.pump(wait=timeout or 3600.0)
    entries: list[ManifestEntry] = []
    waiting: list[Source] = []  # sent, END pending until its digest thread finishes
    targets: dict[int, int] = {}
    seen: set[str | int] = {CONTROL_CHANNEL, MANIFEST_CHANNEL}
    for src in _with_keepalive(sources, s, s.keepalive):
        if src.channel in seen or src.name in seen:
            raise TransferError(f"stream {src.name!r}: channel {src.channel} or name already in use")
        seen.update((src.name, src.channel))
        src.start_digest()
        start = s.resume.get(src.name, 0)
        if not 0 <= start <= (src.bound if src.growing else src.size):
            raise ResumeError(f"stream {src.name!r}: destination resumes at {start}, beyond size {src.size}")
        s.all_total += src.size if not src.growing else start
        s.all_done += start
        if src.name not in s.done:  # even with nothing left to send, END must still be verified
            s.send_stream(src, start)
            if src.growing:  # its size is known now that its writer finished
                s.all_total += src.size - start
            targets[src.channel] = src.size
            waiting.append(src)
        else:
            entries.append(_entry(src))
        for done in [w for w in waiting if w.digest_ready]:
            entries.append(s.end_stream(done))
            waiting.remove(done)
        s.report(src.name, src.size, src.size, force=True)
    for src in waiting:
        entries.append(s.end_stream(src))
    manifest = Manifest(records.migration_id, tuple(sorted(entries, key=lambda e: e.channel)))
    body = manifest.to_json()
    _send_bytes_stream(s, MANIFEST_CHANNEL, "manifest", "manifest", body)
    targets[MANIFEST_CHANNEL] = len(body)
    s.wait_acked(targets)
    return SendResult(manifest, body, s.wire.sent, s.all_total, s.data_bytes)


def _with_keepalive(sources: Iterable[Source], s: _Sender, interval: float) -> Iterator[Source]:
    """Iterate ``sources`` in a helper thread; while the next one is not ready (the memory image
    is still being saved) keep the session alive so B's idle timeout does not fire."""
    it = iter(sources)
    while True:
        box: dict[str, object] = {}
        ready = threading.Event()

        def advance() -> None:
            try:
                box["value"] = next(it)
            except StopIteration:
                box["stop"] = True
            except BaseException as exc:  # re-raised in the sending thread
                box["error"] = exc
            finally:
                ready.set()

        threading.Thread(target=advance, name="transfer-sources", daemon=True).start()
        while not ready.wait(interval):
            s.send(s.records.send_control(CONTROL_CHANNEL, {"type": "keepalive"}))
            s.pump()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        if "stop" in box:
            return
        yield box["value"]  # type: ignore[misc]


def _entry(src: Source) -> ManifestEntry:
    digest, allocated = src.digest()
    return ManifestEntry(src.channel, src.name, src.spec.kind, src.size, allocated, digest, src.spec.target)


def _send_bytes_stream(s: _Sender, ch: int, name: str, kind: str, body: bytes) -> None:
    s.send(s.records.send_control(ch, {"type": "open", "name": name, "kind": kind,
                                       "size": len(body), "start": 0}))
    for off in range(0, len(body), READ_SIZE):
        s.send(s.records.send_data(ch, off, body[off:off + READ_SIZE]))
    s.send(s.records.send_end(ch, len(body), bytes.fromhex(bytes_digest(body))))


# --- destination --------------------------------------------------------------------
class _Receiver:
    def __init__(self, sock: socket.socket, records: RecordLayer, staging: Staging,
                 expected: Mapping[str, Expected], ack_interval: int, timeout: float | None) -> None:
        self.wire = _Wire(sock, timeout)
        self.records = records
        self.staging = staging
        self.expected = expected
        self.ack_interval = ack_interval
        self.unacked: dict[int, int] = {}
        self.manifest_buf: bytearray | None = None
        self.manifest_size = 0
        self.header = bytearray(HEADER_SIZE)
        self.payload = bytearray(RECORD_MAX)
        # Decrypted records wait in a small ring for the writer thread: pwrite and fdatasync
        # release the GIL, so they overlap receiving and decrypting the next records.
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(RING):
            self.free.put(bytearray(RECORD_MAX))
        self.work: queue.SimpleQueue[tuple[object, bytearray | None] | None] = queue.SimpleQueue()
        self.lock = threading.Lock()  # the record layer is shared by the reader and the writer
        self.error: BaseException | None = None
        self.manifest: Manifest | None = None
        self.manifest_json = b""
        self.told = False  # an error message went to the source
        self.acked: dict[int, int] = {}
        self.sync_q: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()

    def next_event(self, out: bytearray) -> object:
        self.wire.recv_exact(memoryview(self.header))
        ftype, length = parse_header(self.header)
        if ftype != RECORD:
            raise UnexpectedMessageError(f"frame type 0x{ftype:02x} inside the data session")
        view = memoryview(self.payload)[:length]
        self.wire.recv_exact(view)
        with self.lock:
            return self.records.open_record_into(view, out)

    def send_control(self, message: dict) -> None:
        with self.lock:
            self.wire.send(self.records.send_control(CONTROL_CHANNEL, message))

    def write_loop(self) -> None:
        """The writer thread: applies events in order; always hands buffers back."""
        while (item := self.work.get()) is not None:
            ev, buf = item
            try:
                if self.error is None:
                    self.apply(ev)
            except BaseException as exc:
                self.error = exc
                _tell_source(self, exc)  # early, so the source stops sending
            finally:
                if buf is not None:
                    self.free.put(buf)

    def apply(self, ev: object) -> None:
        if isinstance(ev, Data):
            self.on_data(ev.channel, ev.offset, ev.data)  # type: ignore[arg-type]
        elif isinstance(ev, Hole):
            self.on_hole(ev.channel, ev.offset, ev.length)
        elif isinstance(ev, Control):
            if ev.message.get("type") == "error":
                raise _peer_error(ev.message)
            if ev.channel == CONTROL_CHANNEL and ev.message.get("type") == "keepalive":
                return
            self.open_stream(ev.channel, ev.message)
        elif isinstance(ev, End):
            self.manifest = self.on_end(ev)
        else:
            raise UnexpectedMessageError(f"unexpected {type(ev).__name__} from the source")

    def read_loop(self) -> None:
        """The calling thread: receive and decrypt until the manifest's END was read."""
        while True:
            buf = self.free.get()
            if self.error is not None:
                raise self.error
            ev = self.next_event(buf)
            if (token := _decision(ev)) is not None:  # A gave up: nothing more comes
                self.free.put(buf)
                raise SourceDecision(token)
            self.work.put((ev, buf) if isinstance(ev, Data) else (ev, None))
            if not isinstance(ev, Data):
                self.free.put(buf)
            if isinstance(ev, End) and ev.channel == MANIFEST_CHANNEL:
                return

    def open_stream(self, ch: int, msg: dict) -> None:
        name, kind, size, start = (msg.get(k) for k in ("name", "kind", "size", "start"))
        growing = msg.get("growing", False)
        if msg.get("type") != "open" or not isinstance(size, int) or not isinstance(start, int) \
                or not isinstance(growing, bool):
            raise ProtocolError(f"channel {ch}: malformed open message")
        if ch == MANIFEST_CHANNEL:
            if kind != "manifest" or not 0 < size <= MAX_MANIFEST or start != 0:
                raise ProtocolError(f"manifest of {size} bytes refused")
            self.manifest_buf, self.manifest_size = bytearray(), size
            return
        want = self.expected.get(name) if isinstance(name, str) else None
        if want is None:
            raise StreamRefusedError(f"stream {name!r} was not expected")
        if kind != want.kind or kind not in KINDS or kind == "manifest":
            raise StreamRefusedError(f"stream {name!r}: kind {kind!r}, expected {want.kind!r}")
        if growing and (want.size is not None or want.max_size is None):
            raise StreamRefusedError(f"stream {name!r} may not grow while it is sent (no upper bound for it)")
        if (want.size is not None and size != want.size) or \
                (want.max_size is not None and size > want.max_size):
            raise StreamRefusedError(f"stream {name!r}: size {size} not accepted "
                                     f"(expected {want.size}, at most {want.max_size})")
        sink = self.staging.add(StreamSpec(ch, cast(str, name), kind, size, want.target, growing))  # a str: expected
        resume_at = sink.spec.size if sink.done else sink.acked
        if start != resume_at:
            raise ResumeError(f"stream {name!r}: source starts at {start}, destination has {resume_at}")

    def ack(self, ch: int, offset: int) -> None:
        with self.lock:  # the syncer and the writer both ACK; never send one that goes back
            if offset > self.acked.get(ch, 0):
                self.wire.send(self.records.send_ack(ch, offset))
                self.acked[ch] = offset

    def on_data(self, ch: int, offset: int, data: memoryview) -> None:
        if ch == MANIFEST_CHANNEL:
            if self.manifest_buf is None or offset != len(self.manifest_buf) or \
                    offset + len(data) > self.manifest_size:
                raise ProtocolError("manifest data out of place")
            self.manifest_buf += data
            return
        sink = self.staging.sink(ch)
        sink.write(offset, data)
        self._maybe_ack(ch, len(data))

    def on_hole(self, ch: int, offset: int, length: int) -> None:
        if ch == MANIFEST_CHANNEL:
            raise ProtocolError("manifest cannot have holes")
        self.staging.sink(ch).hole(offset, length)
        self._maybe_ack(ch, length)

    def _maybe_ack(self, ch: int, n: int) -> None:
        pending = self.unacked.get(ch, 0) + n
        if pending >= self.ack_interval:
            # fdatasync in the syncer thread, so writing goes on while the disk catches up
            sink = self.staging.sink(ch)
            self.sync_q.put((ch, sink.frontier))
            sink.wait_verifier(MAX_HASH_LAG)
            pending = 0
        self.unacked[ch] = pending

    def sync_loop(self) -> None:
        """The syncer thread: make a prefix durable, record it in state.json, then ACK it."""
        while (item := self.sync_q.get()) is not None:
            if self.error is not None:
                continue
            ch, offset = item
            try:
                acked = self.staging.sink(ch).sync(offset)
                self.staging.save_state()
                self.ack(ch, acked)
            except BaseException as exc:
                self.error = exc
                _tell_source(self, exc)

    def on_end(self, ev: End) -> Manifest | None:
        if ev.channel == MANIFEST_CHANNEL:
            body = bytes(self.manifest_buf or b"")
            if len(body) != ev.total_length or len(body) != self.manifest_size or \
                    bytes_digest(body) != ev.sha256.hex():
                raise IntegrityError("manifest: digest or length does not match")
            manifest = Manifest.from_json(body)
            self.check_manifest(manifest)
            self.ack(MANIFEST_CHANNEL, len(body))
            self.manifest_json = body
            return manifest
        sink = self.staging.sink(ev.channel)
        sink.end(ev.total_length, ev.sha256.hex())
        self.staging.save_state()
        self.ack(ev.channel, ev.total_length)
        return None

    def check_manifest(self, manifest: Manifest) -> None:
        if manifest.migration_id != self.records.migration_id:
            raise IntegrityError(f"manifest names migration {manifest.migration_id!r}, "
                                 f"not {self.records.migration_id!r}")
        staged = {s.spec.name: s for s in self.staging.sinks.values()}
        listed = {e.name for e in manifest.streams}
        missing = (set(self.expected) - listed) | (set(staged) - listed) | (listed - set(staged))
        if missing:
            raise IntegrityError(f"manifest and received streams differ: {sorted(missing)}")
        for e in manifest.streams:
            s = staged[e.name]
            if not s.done or e.digest != s.digest or e.size != s.spec.size or \
                    e.kind != s.spec.kind or e.channel != s.spec.channel:
                raise IntegrityError(f"stream {e.name!r}: manifest entry does not match what was verified")


def receive_streams(sock: socket.socket, records: RecordLayer, staging_dir: str | os.PathLike[str],
                    expected: Mapping[str, Expected], *, ack_interval: int = ACK_INTERVAL,
                    timeout: float | None = 60.0) -> ReceiveResult:
    """Receive streams into ``staging_dir`` until the manifest checks out.

    Reopens existing staging state (resume). On failure, everything written is made durable
    (so the next attempt resumes from it), the source is told why, and the error is raised;
    call ``Staging.open(dir).discard()`` to give up instead. The source's decision arriving
    instead of the next record raises SourceDecision (the source is told nothing).
    """
    for name, want in expected.items():
        StreamSpec(1, name, want.kind, 0, want.target)  # validates name and kind
    staging = Staging.open(staging_dir)
    r = _Receiver(sock, records, staging, expected, ack_interval, timeout)
    resumed = staging.resume_offsets()
    writer = threading.Thread(target=r.write_loop, name="transfer-writer", daemon=True)
    syncer = threading.Thread(target=r.sync_loop, name="transfer-syncer", daemon=True)
    try:
        r.send_control({"type": "resume", "offsets": resumed,
                        "done": sorted(x.spec.name for x in staging.sinks.values() if x.done)})
        writer.start()
        syncer.start()
        try:
            r.read_loop()
        finally:
            r.work.put(None)
            if writer.is_alive():
                writer.join()
            r.sync_q.put(None)
            if syncer.is_alive():
                syncer.join()
        if r.error is not None:
            raise r.error
        if r.manifest is None:
            raise TransferError("the source ended without a manifest")
        return ReceiveResult(r.manifest, r.manifest_json, staging, r.wire.received, resumed)
    except BaseException as exc:
        # The writer's error explains a connection the source then closed; the reader's own
        # protocol error (a tampered record) explains the writer's failure to ACK after it.
        error = r.error if r.error is not None and isinstance(exc, PeerConnectionError) else exc
        if r.error is None and not isinstance(exc, SourceDecision):
            _tell_source(r, exc)
        if r.told:
            r.wire.linger()  # only this thread reads the socket; the writer has stopped
        try:
            staging.checkpoint()
        except MigsecError as cp_exc:
            log.warning("could not checkpoint staging after failure: %s", cp_exc)
        for sink in staging.sinks.values():
            sink.close()
        if error is exc:
            raise
        raise error from exc


def _tell_source(r: _Receiver, exc: BaseException) -> None:
    """Tell the source a code and a fixed text; the detail goes to this side's log (the caller's)."""
    if isinstance(exc, PeerConnectionError) or r.records.errored:
        return  # the connection or the session is gone; nothing can be told
    code = peer_error_code(exc)
    try:
        r.send_control({"type": "error", "error": code, "message": peer_error_text(code)})
        r.told = True
    except MigsecError:
        pass

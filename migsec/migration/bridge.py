"""Byte channels of one keyed session, each joined to a unix-socket connection on its host.

A live migration's three connections (libvirt RPC, QEMU's migration stream, the
NBD disk mirror) cross the inter-domain link as numbered channels of the existing
record layer (same keys, counters and record rules as a cold move's streams)::

    A: libvirtd / QEMU --unix--> ChannelBridge(A) ==record layer, TCP==> ChannelBridge(B) --unix--> B's libvirtd / QEMU

A listens on unix sockets in the migration's run directory; each connection libvirt
or QEMU makes there becomes a channel: A sends ``CONTROL(0, {"t": "open", "ch": N,
"kind": K})`` and B connects to its own target for that kind (``connect_target``),
optionally through a filter (B's libvirt RPC proxy). Bytes go both ways as DATA on
the channel's number (each direction has its own offsets); a side that reads EOF
sends ``END(ch, total, SHA-256)`` and the other side shuts down writing, so each
direction closes on its own as with a TCP half-close. Each side hashes every byte of
each channel in each direction; the receiver checks END's digest against its own,
and ``digests()`` gives them all. The signed receipt of a live move vouches for
``commit_digests()``: the same, except that the libvirt channel, still open when the
move commits, is cut at the end of libvirt's Finish3 call and reply
(``migsec.protocol.rpcdigest``); its whole directions are still checked by the ENDs.

Other CONTROL messages on channel 0 (the commit exchange) go to ``recv_control``, with
the host's own events (``post_local``: a ``LocalEvent``, which the peer cannot forge) in
the same queue; the Finish3 reply's cut posts ``LocalEvent(t="finish3", ok=...)``.
Threads: one reader of the session, one reader per unix connection; sealing and
sending share one lock (one record-layer counter); buffers are allocated once per
connection, never per read.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from migsec.crypto import TAG_SIZE
from migsec.errors import (
    IntegrityError,
    MigsecError,
    PeerClosedError,
    PeerTimeoutError,
    ProtocolError,
    UnexpectedMessageError,
    network_error,
)
from migsec.protocol import Ack, Close, Control, Data, End, Hole
from migsec.protocol.framing import HEADER_SIZE, RECORD, RECORD_MAX, parse_header
from migsec.protocol.libvirt_rpc import MessageType
from migsec.protocol.records import CONTROL_CHANNEL, DATA, OVERHEAD, RECORD_HEADER, RECORD_HEADER_SIZE, Buffer
from migsec.protocol.rpcdigest import CUT_SUFFIX, Cut, RpcDigest
from migsec.transfer.plane import TokenBucket

log = logging.getLogger("migsecd.bridge")

CHUNK = 1024 * 1024  # largest read from a unix connection = largest DATA record
KEEPALIVE_S = 5.0
PEER_SILENCE_S = 60.0
KINDS = ("libvirt", "qemu", "nbd")
SMALL = 64 * 1024  # pieces below this are hashed/written in the caller's thread when the ring is idle
RING_SLOTS = 3  # buffers per channel and direction: enough to overlap, little to drain at switchover
EMPTY_SHA256 = hashlib.sha256(b"").digest()
SESSION_BUFFER = 512 * 1024  # A's SO_SNDBUF and B's SO_RCVBUF on the session (see ChannelBridge)


class BridgeError(MigsecError):
    """The session under the channels failed (cut, silent peer, bad record)."""


class LocalEvent(dict):
    """An event of this host's own in the control queue (never one of the peer's messages,
    which are plain dicts): the migration flow waits for both in one place."""


class ChannelFilter:
    """What B puts between a channel and its target (libvirt RPC proxy). Default: none."""

    def from_peer(self, data: bytes) -> tuple[bytes, bytes]:  # pragma: no cover - interface
        """Bytes from the peer -> (bytes for the local target, bytes back to the peer)."""
        raise NotImplementedError

    def from_target(self, data: bytes) -> tuple[bytes, bytes]:  # pragma: no cover - interface
        """Bytes from the local target -> (bytes for the local target, bytes for the peer)."""
        raise NotImplementedError


class _Ring:
    """Reused buffers whose SHA-256 (and, for received bytes, the write to the local socket)
    runs in a thread of its own: hashlib and socket writes release the GIL, so they overlap
    with the record layer's AES-GCM (which holds it) in the thread that fills the buffers."""

    def __init__(self, name: str, write: Callable[[memoryview], None] | None = None,
                 slots: int = RING_SLOTS, size: int = CHUNK) -> None:
        self.bufs = [bytearray(size) for _ in range(slots)]
        self.views = [memoryview(b) for b in self.bufs]
        self.sha = hashlib.sha256()
        self._write = write
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(slots):
            self._free.put(i)
        self._closed = False
        self._pending = 0  # submitted to the thread and not yet processed (only the caller adds)
        self._count = threading.Lock()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def take(self) -> int:
        return self._free.get()

    def give_back(self, i: int) -> None:
        self._free.put(i)

    def submit(self, i: int, n: int) -> None:
        """Hash (and write) slot ``i``'s first ``n`` bytes: in the ring's thread behind what is
        queued, or at once in the caller's thread when nothing is queued and the piece is small
        (an RPC call, an NBD reply: no thread hand-off on the latency path)."""
        if n < SMALL and self._pending == 0:
            self._process(i, n)
            return
        with self._count:
            self._pending += 1
        self._todo.put((i, n))

    def _process(self, i: int, n: int) -> None:
        view = self.views[i][:n]
        self.sha.update(view)
        if self._write is not None:
            self._write(view)
        self._free.put(i)

    def digest(self) -> bytes:
        """SHA-256 of everything submitted so far (waits until it is hashed and written)."""
        if not self._closed:
            done = threading.Event()
            self._todo.put(done)
            done.wait()
        return self.sha.digest()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._todo.put(None)

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            i, n = item
            self._process(i, n)
            with self._count:
                self._pending -= 1


@dataclass
class _Conn:
    channel: int
    kind: str
    sock: socket.socket | None
    filter: ChannelFilter | None = None
    sent_hash: Any = field(default_factory=hashlib.sha256)
    received_hash: Any = field(default_factory=hashlib.sha256)
    sent: int = 0
    received: int = 0
    out_ended: bool = False  # we sent END
    in_ended: bool = False  # the peer's END arrived (and matched)
    target_broken: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # offset + hash + filter order
    tx: _Ring | None = None  # unfiltered channels: hashing of what we send, in its own thread
    rx: _Ring | None = None  # ... and hashing + local writing of what we receive
    first_sent: float = 0.0  # wall-clock times of the first and last DATA each way (the timeline)
    last_sent: float = 0.0
    first_received: float = 0.0
    last_received: float = 0.0
    records_sent: int = 0  # DATA records each way (bytes / records = the mean read size)
    records_received: int = 0
    events: list = field(default_factory=list)  # LocalEvents to post once the bytes went on

    def note_sent(self) -> None:
        self.last_sent = time.time()
        self.records_sent += 1
        if not self.first_sent:
            self.first_sent = self.last_sent

    def note_received(self) -> None:
        self.last_received = time.time()
        self.records_received += 1
        if not self.first_received:
            self.first_received = self.last_received

    def sent_digest(self) -> bytes:
        return self.tx.digest() if self.tx is not None else self.sent_hash.digest()

    def received_digest(self) -> bytes:
        return self.rx.digest() if self.rx is not None else self.received_hash.digest()

    @property
    def done(self) -> bool:
        return self.out_ended and self.in_ended


class ChannelBridge:
    """Run a session's byte channels. ``role`` is "source" (A: listens, opens channels)
    or "destination" (B: ``connect_target(kind, channel) -> (socket, filter|None)``)."""

    def __init__(self, sock: socket.socket, records: Any, *, role: str, peer_name: str,
                 connect_target: Callable[[str, int], tuple[socket.socket, ChannelFilter | None]] | None = None,
                 pre_read: bytes = b"", rate: float | None = None) -> None:
        if role not in ("source", "destination"):
            raise ProtocolError(f"bridge role must be source or destination, not {role!r}")
        if role == "destination" and connect_target is None:
            raise ProtocolError("the destination's bridge needs connect_target")
        if pre_read:
            raise ProtocolError("bytes already read from the session cannot be bridged")

        self.sock = sock
        self.records = records
        self.role = role
        # B's own policy's bandwidth obligation: read no faster (TCP flow control slows A)
        self._bucket = TokenBucket(rate) if rate else None
        self.peer_name = peer_name
        self.connect_target = connect_target
        self.channels: dict[int, _Conn] = {}
        self._send_lock = threading.Lock()
        self._state = threading.Condition()
        self._control: queue.Queue = queue.Queue()
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._next_channel = 1
        self._closing = False
        self.error: BaseException | None = None
        self.wire_sent = 0
        self.wire_received = 0
        self._last_send = time.monotonic()
        self._marks: list[tuple[float, str]] = []  # (wall-clock time, what happened): the timeline
        self._timeline_logged = False
        # every MiB buffered between the two QEMUs is a MiB the guest waits for after QEMU
        # stopped it (downtime): the unix sockets keep the kernel's default buffers, the session
        # socket gets SESSION_BUFFER in the bulk direction
        sock.settimeout(None)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # every record goes out as one send(); Nagle would hold a small one (an NBD reply, an
            # RPC reply's last segment) until the peer ACKs the previous, up to its delayed-ACK
            # timeout (40 ms) when the peer sends nothing back. B's accepted socket has it on.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # all channels share this one TCP connection, read by one thread: whatever of QEMU's
            # stream sits in the TCP buffers must reach B's QEMU before a record queued behind it
            # does. Autotuned buffers grow to megabytes (tcp_rmem's maximum), so at the switchover
            # the NBD flush QEMU sends when it stops the guest waited behind them (and the last
            # pages drained from them): bound A's send and B's receive buffer (the kernel doubles
            # the value; net.core.[rw]mem_max may cap it)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF if role == "source" else socket.SO_RCVBUF,
                            SESSION_BUFFER)
        self._spawn(self._read_session, "migsec-bridge-rx")
        self._spawn(self._keepalive, "migsec-bridge-ka")

    # ---- threads ------------------------------------------------------------------------
    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _fail(self, exc: BaseException) -> None:
        with self._state:
            if self.error is None and not self._closing:
                self.error = exc
                log.warning("bridge to %s failed: %s", self.peer_name, exc)
            self._state.notify_all()
        self._control.put(None)
        self._close_targets()

    def _close_targets(self) -> None:
        for conn in list(self.channels.values()):
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for lsock in self._listeners:
            try:
                lsock.close()
            except OSError:
                pass

    # ---- the timeline -----------------------------------------------------------------------
    def mark(self, what: str) -> None:
        """Note ``what`` happened now (wall clock) in this session's timeline."""
        self._marks.append((time.time(), what))

    def timeline(self) -> list[tuple[float, str]]:
        """(wall-clock time, event) of this session so far, in order: the marks (channel opens,
        ENDs, control messages, RPC procedures on B) and each channel's first and last DATA per
        direction, named as in ``digests``. Both hosts' clocks agree in the lab, so A's and B's
        timelines merge into one (bench/bench_live.py --timeline)."""
        events = list(self._marks)
        mine, theirs = self._directions()
        for c in list(self.channels.values()):
            name = f"{c.kind}.{c.channel}"
            for t, what in ((c.first_sent, f"{name}.{mine} first sent"),
                            (c.last_sent, f"{name}.{mine} last sent ({c.records_sent} records)"),
                            (c.first_received, f"{name}.{theirs} first received"),
                            (c.last_received, f"{name}.{theirs} last received ({c.records_received} records)")):
                if t:
                    events.append((t, what))
        return sorted(events)

    def log_timeline(self) -> None:
        """One log line with the timeline (UTC, ms), for the switchover analysis."""
        line = "; ".join(f"{time.strftime('%H:%M:%S', time.gmtime(t))}.{int(t * 1000) % 1000:03d} {what}"
                         for t, what in self.timeline())
        log.info("timeline (%s) of the session with %s: %s", self.role, self.peer_name, line)

    # ---- sending ------------------------------------------------------------------------
    def _send_frame(self, frame: bytes | memoryview) -> None:
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            raise network_error(exc, f"connection to {self.peer_name} failed while sending") from exc
        self.wire_sent += len(frame)
        self._last_send = time.monotonic()

    def _send_data(self, conn: _Conn, data: memoryview, out: bytearray, *, hash_here: bool = True) -> None:
        """DATA for ``data`` on ``conn``'s channel (caller holds ``conn.lock``)."""
        pos = 0
        while pos < len(data):
            piece = data[pos:pos + CHUNK]
            if hash_here:
                conn.sent_hash.update(piece)
            with self._send_lock:
                n = self.records.seal_data_into(conn.channel, conn.sent, piece, out)
                self._send_frame(memoryview(out)[:n])
            conn.note_sent()
            conn.sent += len(piece)
            pos += len(piece)
        if conn.events:
            self._flush_events(conn)

    def _send_end(self, conn: _Conn) -> None:
        with conn.lock:
            if conn.out_ended:
                return
            with self._send_lock:
                self._send_frame(self.records.send_end(conn.channel, conn.sent, conn.sent_digest()))
            conn.out_ended = True
            self.mark(f"END sent on {conn.kind}.{conn.channel} ({conn.sent} bytes)")
        self._maybe_done(conn)

    def send_control(self, message: dict) -> None:
        """A CONTROL message on channel 0 (the commit exchange)."""
        if self.error is not None:
            raise BridgeError(f"the session to {self.peer_name} failed: {self.error}")
        with self._send_lock:
            self._send_frame(self.records.send_control(CONTROL_CHANNEL, message))
        if message.get("t") != "keepalive":
            self.mark(f"control {message.get('t')} sent")

    def _keepalive(self) -> None:
        while not self._closing and self.error is None:
            time.sleep(1.0)
            if time.monotonic() - self._last_send >= KEEPALIVE_S:
                try:
                    self.send_control({"t": "keepalive"})
                except MigsecError as exc:
                    self._fail(exc)
                    return

    # ---- A: listening -------------------------------------------------------------------
    def listen(self, kind: str, path: str, *, group: int | None = None) -> None:
        """Accept connections on the unix socket ``path`` (mode 0600); each becomes a channel.
        ``group``: the socket is given to that group, mode 0660 (a non-root QEMU connects to
        the NBD socket itself; libvirtd, root, makes the other connections)."""
        if self.role != "source":
            raise ProtocolError("only the source side listens")
        if kind not in KINDS:
            raise ProtocolError(f"unknown channel kind {kind!r}")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            lsock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        if group is not None:
            os.chown(path, -1, group)
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP)
        lsock.listen(8)
        self._listeners.append(lsock)
        self._spawn(self._accept, f"migsec-bridge-{kind}", kind, lsock)

    def _accept(self, kind: str, lsock: socket.socket) -> None:
        while not self._closing and self.error is None:
            try:
                usock, _ = lsock.accept()
            except OSError:
                return
            with self._state:
                channel = self._next_channel
                self._next_channel += 2  # A's channels are odd; 0 is control
                conn = _Conn(channel, kind, usock)
                if kind == "libvirt":
                    self._add_cuts(conn)  # small and framed: hashed in the pumping threads
                else:
                    self._add_rings(conn)
                self.channels[channel] = conn
            try:
                self.send_control({"t": "open", "ch": channel, "kind": kind})
            except MigsecError as exc:
                self._fail(exc)
                return
            log.info("channel %d (%s) opened towards %s", channel, kind, self.peer_name)
            self._spawn(self._pump, f"migsec-ch{channel}", conn)

    # ---- B: opening targets -------------------------------------------------------------
    def _open_target(self, message: dict) -> None:
        channel, kind = message.get("ch"), message.get("kind")
        if self.role != "destination":
            raise UnexpectedMessageError("the destination opened a channel")
        if not isinstance(channel, int) or channel <= 0 or channel % 2 != 1 or channel in self.channels:
            raise ProtocolError(f"bad channel number {channel!r} in open")
        if kind not in KINDS:
            raise ProtocolError(f"the source asked for an unknown channel kind {kind!r}")
        conn = _Conn(channel, str(kind), None)
        if kind == "libvirt":
            self._add_cuts(conn)
        self.channels[channel] = conn
        assert self.connect_target is not None
        try:
            usock, conn.filter = self.connect_target(str(kind), channel)
        except (MigsecError, OSError) as exc:
            log.warning("channel %d (%s): cannot reach the local target: %s", channel, kind, exc)
            conn.target_broken = True
            self._send_end(conn)
            return
        conn.sock = usock
        if conn.filter is None and kind != "libvirt":
            self._add_rings(conn)
        self._spawn(self._pump, f"migsec-ch{channel}", conn)

    def _add_cuts(self, conn: _Conn) -> None:
        """libvirt's RPC: each direction's digest keeps its Finish3 cut (A -> B the call, B -> A
        the reply); the reply's cut posts ``LocalEvent(t="finish3")`` on either host."""
        call, reply = RpcDigest(MessageType.CALL), RpcDigest(MessageType.REPLY)
        reply.on_cut = lambda cut: self._finish3(conn, cut)
        conn.sent_hash, conn.received_hash = (call, reply) if self.role == "source" else (reply, call)

    def _finish3(self, conn: _Conn, cut: Cut) -> None:
        # hashed before it is sent on (B) or written to libvirtd (A): posted after that
        self.mark(f"finish3 reply ({'ok' if cut.ok else 'error'}) at byte {cut.offset} of {conn.kind}.{conn.channel}")
        conn.events.append(LocalEvent(t="finish3", ok=cut.ok, channel=conn.channel))

    def _flush_events(self, conn: _Conn) -> None:
        while conn.events:
            self.post_local(conn.events.pop(0))

    def _add_rings(self, conn: _Conn) -> None:
        conn.tx = _Ring(f"migsec-ch{conn.channel}-tx")
        conn.rx = _Ring(f"migsec-ch{conn.channel}-rx", write=lambda view: self._write_local(conn, view))

    # ---- unix -> session ------------------------------------------------------------------
    def _pump(self, conn: _Conn) -> None:
        """Read the local connection into reused buffers; DATA on its channel; END at EOF."""
        out = bytearray(CHUNK + OVERHEAD)
        assert conn.sock is not None
        try:
            if conn.tx is not None:
                self._pump_ring(conn, conn.tx, out)
                return
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while True:
                try:
                    n = conn.sock.recv_into(buf)
                except OSError as exc:
                    if not self._closing and self.error is None:
                        log.info("channel %d (%s): local read ended: %s", conn.channel, conn.kind, exc)
                    n = 0
                if n == 0:
                    break
                with conn.lock:
                    if conn.filter is None:
                        self._send_data(conn, view[:n], out)
                        continue
                    local, remote = conn.filter.from_target(bytes(view[:n]))
                    if remote:
                        self._send_data(conn, memoryview(remote), out)
                if local:
                    self._write_local(conn, local)
            self._send_end(conn)
        except BaseException as exc:  # noqa: BLE001 - any failure ends the whole session
            self._fail(exc)

    def _pump_ring(self, conn: _Conn, ring: _Ring, out: bytearray) -> None:
        assert conn.sock is not None
        while True:
            i = ring.take()
            try:
                n = conn.sock.recv_into(ring.bufs[i])
            except OSError as exc:
                if not self._closing and self.error is None:
                    log.info("channel %d (%s): local read ended: %s", conn.channel, conn.kind, exc)
                n = 0
            if n == 0:
                ring.give_back(i)
                break
            ring.submit(i, n)  # SHA-256 in the ring's thread while this one seals and sends
            with conn.lock:
                self._send_data(conn, ring.views[i][:n], out, hash_here=False)
        self._send_end(conn)

    # ---- session -> unix ------------------------------------------------------------------
    def _read_session(self) -> None:
        header = bytearray(HEADER_SIZE)
        payload = bytearray(RECORD_MAX)
        out = bytearray(RECORD_MAX)
        hview, pview = memoryview(header), memoryview(payload)
        reply_out = bytearray(CHUNK + OVERHEAD)
        try:
            self.sock.settimeout(PEER_SILENCE_S)  # in the try: the bridge may be closed already
            while True:
                if not self._recv_exact(hview):
                    raise PeerClosedError(f"{self.peer_name} closed the connection")
                ftype, length = parse_header(bytes(header))
                if ftype != RECORD:
                    raise ProtocolError(f"unexpected frame type {ftype} in the live session")
                if not self._recv_exact(pview[:length]):
                    raise PeerClosedError(f"connection to {self.peer_name} ended mid-record")
                self.wire_received += HEADER_SIZE + length
                if self._bucket is not None:
                    self._bucket.take(HEADER_SIZE + length)
                ring = self._data_ring(pview, length)
                if ring is not None:
                    conn, slot = ring
                    assert conn.rx is not None
                    event = self.records.open_record_into(pview[:length], conn.rx.bufs[slot])
                    assert isinstance(event, Data)
                    conn.received += len(event.data)
                    conn.note_received()
                    conn.rx.submit(slot, len(event.data))  # hashed and written by the ring's thread
                    continue
                event = self.records.open_record_into(pview[:length], out)
                if isinstance(event, Data):
                    self._deliver(event.channel, event.data, reply_out)
                elif isinstance(event, End):
                    self._peer_end(event)
                elif isinstance(event, Control):
                    if event.channel != CONTROL_CHANNEL:
                        raise UnexpectedMessageError(f"control message on channel {event.channel}")
                    t = event.message.get("t")
                    if t != "keepalive":
                        self.mark(f"control {t} received")
                    if t == "open":
                        self._open_target(dict(event.message))
                    elif t != "keepalive":
                        self._control.put(dict(event.message))
                elif isinstance(event, Close):
                    with self._state:
                        self._closing = True
                        self._state.notify_all()
                    self._control.put(None)
                    return
                elif isinstance(event, Hole):
                    raise UnexpectedMessageError("HOLE record on a live channel")
                elif not isinstance(event, Ack):
                    raise UnexpectedMessageError(f"unexpected {type(event).__name__}")
        except BaseException as exc:  # noqa: BLE001
            if self._closing:
                return
            if isinstance(exc, OSError):  # only the session socket's recv_into raises it here
                cause = exc
                exc = (PeerTimeoutError(f"{self.peer_name} was silent for {PEER_SILENCE_S:.0f} s")
                       if isinstance(exc, (socket.timeout, TimeoutError))
                       else network_error(exc, f"connection to {self.peer_name} failed"))
                exc.__cause__ = cause
            self._fail(exc)

    def _data_ring(self, pview: memoryview, length: int) -> tuple[_Conn, int] | None:
        """(conn, ring slot) when this record is DATA for an unfiltered channel (from its clear
        header; the AEAD checks that header before anything is used)."""
        if length < RECORD_HEADER_SIZE:
            return None
        rtype, channel, _seq, _offset, n = RECORD_HEADER.unpack_from(pview, 0)
        if rtype != DATA:
            return None
        conn = self.channels.get(channel)
        if conn is None or conn.rx is None:
            return None
        if conn.in_ended:
            raise ProtocolError(f"data on channel {channel} after its END")
        if n > CHUNK or length - RECORD_HEADER_SIZE - TAG_SIZE != n:
            raise ProtocolError(f"channel {channel}: DATA record of {n} bytes (at most {CHUNK} on a live channel)")
        return conn, conn.rx.take()

    def _recv_exact(self, view: memoryview) -> bool:
        pos, n = 0, len(view)
        while pos < n:
            got = self.sock.recv_into(view[pos:], n - pos)
            if got == 0:
                return False
            pos += got
        return True

    def _channel(self, channel: int) -> _Conn:
        conn = self.channels.get(channel)
        if conn is None:
            raise ProtocolError(f"data on channel {channel}, which was never opened")
        return conn

    def _deliver(self, channel: int, data: Buffer, reply_out: bytearray) -> None:
        conn = self._channel(channel)
        if conn.in_ended:
            raise ProtocolError(f"data on channel {channel} after its END")
        conn.received_hash.update(data)
        conn.received += len(data)
        conn.note_received()
        if conn.filter is None:
            self._write_local(conn, data)
        else:
            with conn.lock:
                local, remote = conn.filter.from_peer(bytes(data))
                if remote and not conn.out_ended:
                    self._send_data(conn, memoryview(remote), reply_out)
            if local:
                self._write_local(conn, local)
        if conn.events:
            self._flush_events(conn)

    def _write_local(self, conn: _Conn, data: Buffer) -> None:
        if conn.sock is None or conn.target_broken:
            return  # hashed and counted; the target is gone (its END tells the peer)
        try:
            conn.sock.sendall(data)
        except OSError as exc:
            log.info("channel %d (%s): local write failed: %s", conn.channel, conn.kind, exc)
            conn.target_broken = True

    def _peer_end(self, event: End) -> None:
        conn = self._channel(event.channel)
        if event.total_length != conn.received or event.sha256 != conn.received_digest():
            raise IntegrityError(f"channel {event.channel} ({conn.kind}): {self.peer_name} sent "
                                 f"{event.total_length} bytes with a SHA-256 that differs from the "
                                 f"{conn.received} bytes received here")
        conn.in_ended = True
        self.mark(f"END received on {conn.kind}.{conn.channel} ({conn.received} bytes)")
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if conn.target_broken and not conn.out_ended:
            self._send_end(conn)
        self._maybe_done(conn)

    def _maybe_done(self, conn: _Conn) -> None:
        if conn.done:
            if conn.sock is not None:
                try:
                    conn.sock.close()
                except OSError:
                    pass
            with self._state:
                self._state.notify_all()

    # ---- what the migration flow uses -------------------------------------------------------
    def recv_control(self, timeout: float) -> dict:
        """The next commit-exchange message from the peer; BridgeError if the session failed."""
        try:
            message = self._control.get(timeout=timeout)
        except queue.Empty:
            raise BridgeError(f"no answer from {self.peer_name} within {timeout:.0f} s") from None
        if message is None:
            self._control.put(None)
            raise BridgeError(f"the session to {self.peer_name} ended: {self.error or 'closed'}")
        return message

    def post_local(self, event: LocalEvent) -> None:
        """Queue one of this host's own events for ``recv_control`` (from any thread)."""
        self._control.put(event)

    def wait_channels_done(self, timeout: float, kinds: tuple[str, ...] = KINDS) -> None:
        """Until every channel of ``kinds`` ended in both directions (the connections libvirt
        and QEMU made are closed); BridgeError on a failure or timeout."""
        deadline = time.monotonic() + timeout
        with self._state:
            while True:
                if self.error is not None:
                    raise BridgeError(f"the session to {self.peer_name} failed: {self.error}")
                busy = [f"{c.channel}:{c.kind}" for c in self.channels.values() if c.kind in kinds and not c.done]
                if not busy:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BridgeError(f"channels {busy} still open {timeout:.0f} s after libvirt finished")
                self._state.wait(min(left, 1.0))

    def digests(self) -> dict[str, bytes]:
        """SHA-256 of every channel's bytes per direction, named ``<kind>.<ch>.a2b|b2a``."""
        out: dict[str, bytes] = {}
        mine, theirs = self._directions()
        for c in sorted(self.channels.values(), key=lambda c: c.channel):
            out[f"{c.kind}.{c.channel}.{mine}"] = c.sent_digest()
            out[f"{c.kind}.{c.channel}.{theirs}"] = c.received_digest()
        return out

    def commit_digests(self) -> dict[str, bytes]:
        """What a live receipt vouches for: ``digests()``, but each libvirt channel direction
        cut at its Finish3 packet (named ``...a2b@finish3``); ProtocolError when a direction has
        no Finish3 (libvirt's Finish did not cross this channel, or not in libvirt's framing)."""
        out: dict[str, bytes] = {}
        for name, digest in self.digests().items():
            kind, ch, direction = name.split(".")
            if kind != "libvirt":
                out[name] = digest
                continue
            cut = self._cut(self.channels[int(ch)], direction)
            if cut is None:
                raise ProtocolError(f"no libvirt Finish3 {'call' if direction == 'a2b' else 'reply'} on "
                                    f"channel {ch} ({direction}): nothing to commit to")
            out[name + CUT_SUFFIX] = cut.digest
        return out

    def finish3_ok(self) -> bool:
        """Did libvirt's successful Finish3 reply cross a libvirt channel of this session?"""
        return any(cut is not None and cut.ok for cut in (self._cut(c, "b2a") for c in self.channels.values()))

    def _directions(self) -> tuple[str, str]:
        """(what this host sends, what it receives), as ``digests`` names them."""
        return ("a2b", "b2a") if self.role == "source" else ("b2a", "a2b")

    def _cut(self, conn: _Conn, direction: str) -> Cut | None:
        """The Finish3 cut of ``conn``'s ``direction`` (a libvirt channel's), or None."""
        hashed = conn.sent_hash if direction == self._directions()[0] else conn.received_hash
        return hashed.cut if isinstance(hashed, RpcDigest) else None

    def channel_bytes(self) -> dict[str, int]:
        """Bytes per channel and direction (same names as ``digests``)."""
        out: dict[str, int] = {}
        mine, theirs = self._directions()
        for c in self.channels.values():
            out[f"{c.kind}.{c.channel}.{mine}"] = c.sent
            out[f"{c.kind}.{c.channel}.{theirs}"] = c.received
        return out

    def stop_listening(self) -> None:
        for lsock in self._listeners:
            try:
                lsock.close()
            except OSError:
                pass

    def close(self, *, clean: bool = False) -> None:
        """End the session (CLOSE first when ``clean``) and every local connection."""
        if clean and self.error is None:
            try:
                with self._send_lock:
                    self._send_frame(self.records.send_close())
            except MigsecError:
                pass
        with self._state:
            self._closing = True
            self._state.notify_all()
        self._close_targets()
        for conn in list(self.channels.values()):
            for ring in (conn.tx, conn.rx):
                if ring is not None:
                    ring.digest()  # what was queued is hashed, so digests() stays complete
                    ring.close()
        if not self._timeline_logged and self.channels:
            self._timeline_logged = True
            self.log_timeline()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        self._control.put(None)


"""A keyed record-layer session over a blocking socket (the data plane's I/O half).

The record layer itself is sans-IO (``migsec.protocol.records``); this class owns
the socket: it writes whole frames, reads with the bulk path (header, then
``readinto`` a reused buffer) and counts the bytes on the wire. Channel 0 carries
the migration's control messages (stream offers, receipts, decisions); streams
use channels 1 and up.
"""
from __future__ import annotations

import socket
import time
from typing import Any

from migsec.errors import ProtocolError, TruncatedStreamError, UnexpectedMessageError
from migsec.protocol import Ack, Close, Control, RecordLayer
from migsec.protocol.framing import HEADER_SIZE, RECORD, RECORD_MAX, parse_header

CONTROL_CHANNEL = 0


class PeerChannel:
    """Full-duplex record layer on ``sock`` for ``role`` ("source" or "destination")."""

    def __init__(self, sock: socket.socket, keys: Any, role: str, leftover: bytes = b"") -> None:
        self.sock = sock
        self.keys = keys
        self.role = role
        self.layer = RecordLayer(keys, role)
        self._pending = bytearray(leftover)
        self._buf = bytearray(RECORD_MAX)
        self._out = bytearray(RECORD_MAX)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.acks: dict[int, int] = {}

    @property
    def migration_id(self) -> str:
        return self.keys.migration_id

    # ---- sending ----------------------------------------------------------------------
    def send(self, frame: bytes | bytearray | memoryview) -> None:
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            raise ConnectionError(f"sending to the peer failed: {exc}") from exc
        self.bytes_sent += len(frame)

    def send_control(self, message: dict) -> None:
        self.send(self.layer.send_control(CONTROL_CHANNEL, message))

    # ---- receiving --------------------------------------------------------------------
    def _read_into(self, view: memoryview) -> None:
        n = 0
        if self._pending:
            n = min(len(self._pending), len(view))
            view[:n] = self._pending[:n]
            del self._pending[:n]
        while n < len(view):
            try:
                got = self.sock.recv_into(view[n:])
            except socket.timeout:
                raise
            except OSError as exc:
                raise ConnectionError(f"receiving from the peer failed: {exc}") from exc
            if got == 0:
                raise ConnectionError("the peer closed the connection")
            n += got
        self.bytes_received += len(view)

    def next_event(self, timeout: float | None = None) -> Any:
        """The next record event (DATA events are views of an internal buffer)."""
        self.sock.settimeout(timeout)
        header = bytearray(HEADER_SIZE)
        self._read_into(memoryview(header))
        frame_type, length = parse_header(header)
        if frame_type != RECORD:
            raise UnexpectedMessageError(f"frame type 0x{frame_type:02x} after the handshake")
        payload = memoryview(self._buf)[:length]
        self._read_into(payload)
        event = self.layer.open_record_into(payload, self._out)
        if isinstance(event, Ack):
            self.acks[event.channel] = event.offset
        return event

    def recv_control(self, timeout: float | None = None) -> dict:
        """Wait for the next control message, keeping acknowledgements that arrive meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.01, deadline - time.monotonic())
            try:
                event = self.next_event(remaining)
            except socket.timeout as exc:
                raise ProtocolError(f"no message from the peer within {timeout} s") from exc
            if isinstance(event, Control):
                if event.channel != CONTROL_CHANNEL:
                    raise UnexpectedMessageError(f"control message on stream channel {event.channel}")
                return dict(event.message)
            if isinstance(event, Close):
                raise TruncatedStreamError("the peer closed the session while a reply was awaited")
            if isinstance(event, Ack):
                continue
            raise UnexpectedMessageError(f"unexpected {type(event).__name__} record while awaiting a reply")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

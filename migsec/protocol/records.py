"""The record layer: AEAD records over one keyed session, in numbered channels.

Built from :class:`SessionKeys` after the handshake (like wsproto's frame protocol
after its opening handshake). Every record is one RECORD frame whose payload is::

    header (29 bytes, clear, the AEAD associated data):
        type u8 | channel u32 | sequence u64 | offset u64 | length u64
    AES-256-GCM(ciphertext || tag) under the direction's key,
        nonce = 0x00000000 || sequence (u64)

The sequence is a per-direction counter: the receiver knows which one comes next,
so a reordered, dropped or duplicated record is a RecordSequenceError before any
decryption, and a header edited to hide that breaks the tag (RecordAuthError).
Sealing stops before the counter reaches ``nonce_limit`` (NonceExhaustedError).

Record types and their fields (``length`` is the plaintext length unless noted):
DATA(channel, offset, bytes); HOLE(channel, offset, length) with an empty body;
CONTROL(channel, JSON object); END(channel, total length in ``offset``, body = SHA-256);
ACK(channel, cumulative offset) for the opposite direction's channel; CLOSE.
Channels open on first use; per channel, extents move forward only and nothing
follows END. CLOSE while a received channel has no END, or end of input without
CLOSE, is a TruncatedStreamError. Any error leaves the layer in ERROR for good.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Union

from migsec.crypto import TAG_SIZE, Aead
from migsec.errors import (
    DecryptionError,
    MalformedMessageError,
    MigsecError,
    NonceExhaustedError,
    ProtocolError,
    RecordAuthError,
    RecordSequenceError,
    TruncatedStreamError,
    UnexpectedMessageError,
)
from migsec.protocol.codec import canonical_json, parse_json_object
from migsec.protocol.framing import (
    CLOSED,
    HEADER as FRAME_HEADER,
    HEADER_SIZE as FRAME_HEADER_SIZE,
    NEED_DATA,
    RECORD,
    RECORD_MAX,
    Frame,
    FrameDecoder,
)
from migsec.protocol.session import SessionKeys

DATA, HOLE, CONTROL, END, ACK, CLOSE = 1, 2, 3, 4, 5, 6
RECORD_NAMES = {DATA: "DATA", HOLE: "HOLE", CONTROL: "CONTROL", END: "END", ACK: "ACK", CLOSE: "CLOSE"}

RECORD_HEADER = struct.Struct(">BIQQQ")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 29
_FRAME_AND_RECORD = struct.Struct(">BI" + "BIQQQ")
_NONCE = struct.Struct(">IQ")

OVERHEAD = FRAME_HEADER_SIZE + RECORD_HEADER_SIZE + TAG_SIZE  # 50 bytes per record on the wire
MAX_DATA = RECORD_MAX - RECORD_HEADER_SIZE - TAG_SIZE  # just over 4 MiB
RECORD_SIZE = 1024 * 1024  # what senders should use per DATA record
MAX_CONTROL = 64 * 1024
CONTROL_CHANNEL = 0  # every session's control messages (handshake follow-up, commit, keepalive)
MAX_OFFSET = 2**63 - 1
MAX_CHANNEL = 2**32 - 1
NONCE_LIMIT = 2**48  # records per direction and session; far below GCM's counter-nonce bound
AEAD_ALGORITHM = "aes-256-gcm"

Buffer = Union[bytes, bytearray, memoryview]


# --- events ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Data:
    """Bytes of a channel at ``offset``. From ``open_record_into`` ``data`` is a view of ``out``."""

    channel: int
    offset: int
    data: Buffer


@dataclass(frozen=True, slots=True)
class Hole:
    """``length`` zero bytes of a channel at ``offset`` (a sparse extent; nothing was sent)."""

    channel: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Control:
    channel: int
    message: dict


@dataclass(frozen=True, slots=True)
class End:
    """The channel is complete: ``total_length`` bytes whose SHA-256 is ``sha256``."""

    channel: int
    total_length: int
    sha256: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """The peer has durably received our ``channel`` up to ``offset`` (cumulative)."""

    channel: int
    offset: int


@dataclass(frozen=True, slots=True)
class Close:
    """The peer finished the session cleanly (every channel it opened had END)."""


Event = Union[Data, Hole, Control, End, Ack, Close]


class _Channel:
    __slots__ = ("position", "ended", "total", "acked")

    def __init__(self) -> None:
        self.position = 0  # end of the furthest extent
        self.ended = False
        self.total = 0
        self.acked = 0


def _check_channel(channel: int) -> None:
    if not isinstance(channel, int) or not 0 <= channel <= MAX_CHANNEL:
        raise ProtocolError(f"channel must be an integer in [0, {MAX_CHANNEL}], got {channel!r}")


def _check_offset(offset: int, what: str = "offset") -> None:
    if not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        raise ProtocolError(f"{what} must be an integer in [0, 2**63), got {offset!r}")


class RecordLayer:
    """One side of a keyed session. ``role`` is "source" (sends a->b) or "destination".

    Sending: ``send_data``/``seal_data_into``, ``send_hole``, ``send_control``,
    ``send_end``, ``send_ack``, ``send_close`` return (or write) whole frames.
    Receiving: ``receive_data(bytes)`` + ``next_event()`` (an Event or NEED_DATA), or,
    for a blocking driver that reads frames itself, ``open_record_into(payload, out)``.
    """

    def __init__(self, keys: SessionKeys, role: str, *, nonce_limit: int = NONCE_LIMIT) -> None:
        send_key, receive_key = keys.keys_for(role)
        self.role = role
        self.migration_id = keys.migration_id
        self._sealer = Aead(AEAD_ALGORITHM, send_key)
        self._opener = Aead(AEAD_ALGORITHM, receive_key)
        self._nonce_limit = nonce_limit
        self._send_seq = 0
        self._recv_seq = 0
        self._sent: dict[int, _Channel] = {}
        self._received: dict[int, _Channel] = {}
        self._decoder = FrameDecoder({RECORD: RECORD_MAX})
        self._local_closed = False
        self._peer_closed = False
        self._error: MigsecError | None = None

    # --- state ----------------------------------------------------------------------
    @property
    def errored(self) -> bool:
        return self._error is not None

    @property
    def peer_closed(self) -> bool:
        return self._peer_closed

    @property
    def records_sent(self) -> int:
        return self._send_seq

    @property
    def records_received(self) -> int:
        return self._recv_seq

    def acked(self, channel: int) -> int:
        """Cumulative offset the peer acknowledged for our ``channel`` (0 if none)."""
        ch = self._sent.get(channel)
        return ch.acked if ch else 0

    def sent_position(self, channel: int) -> int:
        ch = self._sent.get(channel)
        return ch.position if ch else 0

    def received_position(self, channel: int) -> int:
        ch = self._received.get(channel)
        return ch.position if ch else 0

    def open_channels(self) -> list[int]:
        """Channels the peer opened that have no END yet."""
        return sorted(c for c, ch in self._received.items() if not ch.ended)

    def _check_usable(self) -> None:
        if self._error is not None:
            raise ProtocolError(f"record layer is in ERROR state after: {self._error}")

    def _fail(self, exc: MigsecError) -> MigsecError:
        self._error = exc
        return exc

    # --- sending ----------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._check_usable()
        if self._local_closed:
            raise UnexpectedMessageError("record layer already sent CLOSE")
        seq = self._send_seq
        if seq >= self._nonce_limit:
            raise NonceExhaustedError(
                f"{seq} records sealed under this key; re-key with a fresh handshake")
        return seq

    def _sent_channel(self, channel: int) -> _Channel:
        _check_channel(channel)
        ch = self._sent.get(channel)
        if ch is None:
            ch = self._sent[channel] = _Channel()
        if ch.ended:
            raise UnexpectedMessageError(f"channel {channel} already ended")
        return ch

    def _seal(self, rtype: int, channel: int, offset: int, length: int, body: Buffer) -> bytes:
        seq = self._next_seq()
        header = RECORD_HEADER.pack(rtype, channel, seq, offset, length)
        sealed = self._sealer.seal(_NONCE.pack(0, seq), body, header)
        self._send_seq = seq + 1
        return FRAME_HEADER.pack(RECORD, RECORD_HEADER_SIZE + len(sealed)) + header + sealed

    def _check_extent(self, ch: _Channel, channel: int, offset: int, length: int) -> None:
        _check_offset(offset)
        if offset < ch.position:
            raise ProtocolError(
                f"channel {channel}: offset {offset} is behind the stream position {ch.position}")
        if offset + length > MAX_OFFSET:
            raise ProtocolError(f"channel {channel}: extent ends beyond 2**63")

    def send_data(self, channel: int, offset: int, data: Buffer) -> bytes:
        """One DATA frame (allocates; use ``seal_data_into`` on the bulk path)."""
        ch = self._sent_channel(channel)
        n = len(data)
        if not 0 < n <= MAX_DATA:
            raise ProtocolError(f"DATA record must carry 1..{MAX_DATA} bytes, got {n}")
        self._check_extent(ch, channel, offset, n)
        frame = self._seal(DATA, channel, offset, n, data)
        ch.position = offset + n
        return frame

    def seal_data_into(self, channel: int, offset: int, data: Buffer, out: bytearray | memoryview) -> int:
        """Write one whole DATA frame for ``data`` into ``out``; returns its length.

        ``out`` needs ``len(data) + OVERHEAD`` bytes; reuse it across records.
        """
        ch = self._sent_channel(channel)
        n = len(data)
        if not 0 < n <= MAX_DATA:
            raise ProtocolError(f"DATA record must carry 1..{MAX_DATA} bytes, got {n}")
        self._check_extent(ch, channel, offset, n)
        total = OVERHEAD + n
        if len(out) < total:
            raise ProtocolError(f"output buffer of {len(out)} bytes is too small for {total}")
        seq = self._next_seq()
        _FRAME_AND_RECORD.pack_into(out, 0, RECORD, total - FRAME_HEADER_SIZE, DATA, channel, seq, offset, n)
        view = memoryview(out)
        aad = bytes(view[FRAME_HEADER_SIZE:FRAME_HEADER_SIZE + RECORD_HEADER_SIZE])
        self._sealer.seal_into(_NONCE.pack(0, seq), data, aad, view[FRAME_HEADER_SIZE + RECORD_HEADER_SIZE:total])
        self._send_seq = seq + 1
        ch.position = offset + n
        return total

    def send_hole(self, channel: int, offset: int, length: int) -> bytes:
        """A sparse extent of ``length`` zero bytes; no zero bytes are sent."""
        ch = self._sent_channel(channel)
        if not isinstance(length, int) or length <= 0:
            raise ProtocolError(f"HOLE length must be a positive integer, got {length!r}")
        self._check_extent(ch, channel, offset, length)
        frame = self._seal(HOLE, channel, offset, length, b"")
        ch.position = offset + length
        return frame

    def send_control(self, channel: int, message: dict[str, Any]) -> bytes:
        """A JSON object on ``channel`` (manifests, receipts, application messages)."""
        self._sent_channel(channel)  # opens it, refuses an ended one
        if not isinstance(message, dict):
            raise ProtocolError("CONTROL message must be a JSON object")
        body = canonical_json(message)
        if len(body) > MAX_CONTROL:
            raise ProtocolError(f"CONTROL message of {len(body)} bytes exceeds {MAX_CONTROL}")
        return self._seal(CONTROL, channel, 0, len(body), body)

    def send_end(self, channel: int, total_length: int, sha256: bytes) -> bytes:
        """Close ``channel``: it held ``total_length`` bytes with this SHA-256."""
        ch = self._sent_channel(channel)
        _check_offset(total_length, "total length")
        if total_length < ch.position:
            raise ProtocolError(
                f"channel {channel}: total length {total_length} is below the bytes sent ({ch.position})")
        if not isinstance(sha256, (bytes, bytearray)) or len(sha256) != 32:
            raise ProtocolError("END needs a 32-byte SHA-256 digest")
        frame = self._seal(END, channel, total_length, 32, bytes(sha256))
        ch.ended, ch.total = True, total_length
        return frame

    def send_ack(self, channel: int, offset: int) -> bytes:
        """Acknowledge the peer's ``channel`` up to ``offset`` (what we stored durably)."""
        _check_channel(channel)
        _check_offset(offset)
        ch = self._received.get(channel)
        if ch is None:
            raise ProtocolError(f"cannot ACK channel {channel}: nothing received on it")
        limit = ch.total if ch.ended else ch.position
        if offset > limit or offset < ch.acked:
            raise ProtocolError(
                f"ACK offset {offset} for channel {channel} outside [{ch.acked}, {limit}]")
        frame = self._seal(ACK, channel, offset, 0, b"")
        ch.acked = offset
        return frame

    def send_close(self) -> bytes:
        """The last record of this direction."""
        frame = self._seal(CLOSE, 0, 0, 0, b"")
        self._local_closed = True
        return frame

    # --- receiving ----------------------------------------------------------------------
    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the peer; ``b""`` means the connection ended."""
        self._check_usable()
        try:
            self._decoder.receive_data(data)
        except MigsecError as exc:
            raise self._fail(exc) from None

    def next_event(self) -> Event | object:
        """The next event, or NEED_DATA. Raises (and enters ERROR) on any bad record."""
        self._check_usable()
        try:
            frame = self._decoder.next_frame()
            if frame is NEED_DATA:
                return NEED_DATA
            if frame is CLOSED:
                if self._peer_closed:
                    return NEED_DATA
                raise TruncatedStreamError(
                    f"connection ended without CLOSE; open channels: {self.open_channels()}")
            assert isinstance(frame, Frame)
            return self._open_record(memoryview(frame.payload), None)
        except MigsecError as exc:
            raise self._fail(exc) from None

    def open_record_into(self, payload: Buffer, out: bytearray | memoryview) -> Event:
        """Check and decrypt one RECORD frame payload (the bytes after the 5-byte frame
        header, see ``framing.parse_header``); DATA is decrypted into ``out`` and the
        event's ``data`` is a view of it, valid until ``out`` is reused."""
        self._check_usable()
        try:
            return self._open_record(memoryview(payload), out)
        except MigsecError as exc:
            raise self._fail(exc) from None

    def _open_record(self, payload: memoryview, out: bytearray | memoryview | None) -> Event:
        if self._peer_closed:
            raise UnexpectedMessageError("record after the peer's CLOSE")
        if len(payload) < RECORD_HEADER_SIZE + TAG_SIZE:
            raise MalformedMessageError(f"record of {len(payload)} bytes is shorter than header + tag")
        header = bytes(payload[:RECORD_HEADER_SIZE])
        rtype, channel, seq, offset, length = RECORD_HEADER.unpack(header)
        if seq != self._recv_seq:
            why = "duplicated or replayed" if seq < self._recv_seq else "a record is missing (dropped or reordered)"
            raise RecordSequenceError(f"record sequence {seq}, expected {self._recv_seq}: {why}")
        if rtype not in RECORD_NAMES:
            raise MalformedMessageError(f"unknown record type {rtype}")
        body = payload[RECORD_HEADER_SIZE:]
        body_len = len(body) - TAG_SIZE
        if rtype in (DATA, CONTROL, END):
            if body_len != length:
                raise MalformedMessageError(
                    f"{RECORD_NAMES[rtype]} record announces {length} bytes but carries {body_len}")
        elif body_len != 0:
            raise MalformedMessageError(f"{RECORD_NAMES[rtype]} record must have an empty body")
        nonce = _NONCE.pack(0, seq)
        try:
            if rtype == DATA and out is not None:
                n = self._opener.open_into(nonce, body, header, out)
                plain: Buffer = memoryview(out)[:n]
            else:
                plain = self._opener.open(nonce, body, header)
        except DecryptionError:
            raise RecordAuthError(f"record {seq} failed authentication (tampered or wrong key)") from None
        # authentic from here on: advance the counter, then apply the channel rules
        self._recv_seq = seq + 1
        return self._apply(rtype, channel, offset, length, plain)

    def _received_channel(self, channel: int, what: str) -> _Channel:
        ch = self._received.get(channel)
        if ch is None:
            ch = self._received[channel] = _Channel()
        if ch.ended:
            raise RecordSequenceError(f"{what} on channel {channel} after its END")
        return ch

    def _apply(self, rtype: int, channel: int, offset: int, length: int, plain: Buffer) -> Event:
        if rtype in (DATA, HOLE):
            ch = self._received_channel(channel, RECORD_NAMES[rtype])
            if length == 0 or offset < ch.position or offset + length > MAX_OFFSET:
                raise RecordSequenceError(
                    f"channel {channel}: extent [{offset}, +{length}) overlaps or precedes position {ch.position}")
            ch.position = offset + length
            if rtype == DATA:
                return Data(channel, offset, plain)
            return Hole(channel, offset, length)
        if rtype == CONTROL:
            self._received_channel(channel, "CONTROL")
            if length > MAX_CONTROL:
                raise MalformedMessageError(f"CONTROL record of {length} bytes exceeds {MAX_CONTROL}")
            return Control(channel, parse_json_object(plain, f"CONTROL record on channel {channel}"))
        if rtype == END:
            ch = self._received_channel(channel, "END")
            if len(plain) != 32:
                raise MalformedMessageError(f"END record on channel {channel} must carry a 32-byte SHA-256")
            if offset < ch.position or offset > MAX_OFFSET:
                raise RecordSequenceError(
                    f"channel {channel}: END total {offset} is below the bytes received ({ch.position})")
            ch.ended, ch.total = True, offset
            return End(channel, offset, bytes(plain))
        if rtype == ACK:
            sent = self._sent.get(channel)
            limit = (sent.total if sent.ended else sent.position) if sent else -1
            if sent is None or offset > limit or offset < sent.acked:
                raise RecordSequenceError(
                    f"ACK for channel {channel} at {offset} does not match what was sent")
            sent.acked = offset
            return Ack(channel, offset)
        # CLOSE
        if channel != 0 or offset != 0 or length != 0:
            raise MalformedMessageError("CLOSE record with non-zero fields")
        unfinished = self.open_channels()
        if unfinished:
            raise TruncatedStreamError(f"peer closed with channels {unfinished} not ended")
        self._peer_closed = True
        return Close()

"""Length-prefixed frames: ``type (1 byte) || length (4 bytes, big endian) || payload``.

The announced length is checked against the hard maximum for that frame type as
soon as the 5-byte header is in, before any buffer for the payload exists, so a
peer cannot make us allocate (or wait for) more than the maximum.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Mapping

from migsec.errors import FrameTooLargeError, MalformedMessageError, TruncatedStreamError

HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size  # 5

# frame types
AUTH_REQUEST = 0x01
AUTH_REPLY = 0x02
LOCAL_MIGRATION_REQUEST = 0x03
MIG_REQ = 0x04
MIG_RESP = 0x05
# first contact with a peer known only by a pinned fingerprint: A asks for B's certificate
# before its MigReq (which must be encrypted to B's key); the pin authenticates the answer
CERT_REQUEST = 0x06
CERT_REPLY = 0x07
RECORD = 0x10

FRAME_NAMES = {
    AUTH_REQUEST: "AuthRequest",
    AUTH_REPLY: "AuthReply",
    LOCAL_MIGRATION_REQUEST: "MigrationRequest",
    MIG_REQ: "MigReq",
    MIG_RESP: "MigResp",
    CERT_REQUEST: "CertRequest",
    CERT_REPLY: "CertReply",
    RECORD: "record",
}

CONTROL_MAX = 64 * 1024
RECORD_MAX = 4 * 1024 * 1024 + 64  # a 4 MiB record plus its header and tag
DEFAULT_LIMITS: Mapping[int, int] = {
    AUTH_REQUEST: CONTROL_MAX,
    AUTH_REPLY: CONTROL_MAX,
    LOCAL_MIGRATION_REQUEST: CONTROL_MAX,
    MIG_REQ: CONTROL_MAX,
    MIG_RESP: CONTROL_MAX,
    CERT_REQUEST: 64,
    CERT_REPLY: CONTROL_MAX,
    RECORD: RECORD_MAX,
}


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""Returned by ``next_event()`` when more bytes are needed."""

CLOSED = _Sentinel("CLOSED")
"""Returned by a FrameDecoder after end of input at a frame boundary."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    payload: bytes


def encode_frame(frame_type: int, payload: bytes, limits: Mapping[int, int] = DEFAULT_LIMITS) -> bytes:
    """One frame; refuses what the receiver would refuse."""
    check_header(frame_type, len(payload), limits)
    return HEADER.pack(frame_type, len(payload)) + payload


def check_header(frame_type: int, length: int, limits: Mapping[int, int] = DEFAULT_LIMITS) -> None:
    limit = limits.get(frame_type)
    if limit is None:
        raise MalformedMessageError(f"unknown frame type 0x{frame_type:02x}")
    if length > limit:
        raise FrameTooLargeError(
            f"{FRAME_NAMES.get(frame_type, 'frame')} of {length} bytes exceeds the maximum of {limit}")


def parse_header(header: bytes | bytearray | memoryview,
                 limits: Mapping[int, int] = DEFAULT_LIMITS) -> tuple[int, int]:
    """``(type, length)`` of a 5-byte frame header, checked against the limits.

    For blocking drivers that read the header, then ``readinto`` a reused buffer.
    """
    if len(header) != HEADER_SIZE:
        raise MalformedMessageError(f"frame header must be {HEADER_SIZE} bytes, got {len(header)}")
    frame_type, length = HEADER.unpack(header)
    check_header(frame_type, length, limits)
    return frame_type, length


class FrameDecoder:
    """Incremental frame parser: ``receive_data(bytes)``, then ``next_frame()`` until NEED_DATA.

    ``receive_data(b"")`` means end of input: ``next_frame()`` then returns CLOSED, or
    raises TruncatedStreamError if the input stopped inside a frame.
    """

    def __init__(self, limits: Mapping[int, int] = DEFAULT_LIMITS) -> None:
        self._limits = dict(limits)
        self._buf = bytearray()
        self._eof = False
        self._pending: tuple[int, int] | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof and data:
            raise MalformedMessageError("data received after end of input")
        if not data:
            self._eof = True
            return
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self) -> Frame | _Sentinel:
        if self._pending is None:
            if len(self._buf) < HEADER_SIZE:
                return self._at_shortage()
            self._pending = parse_header(memoryview(self._buf)[:HEADER_SIZE], self._limits)
        frame_type, length = self._pending
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return self._at_shortage()
        payload = bytes(memoryview(self._buf)[HEADER_SIZE:end])
        del self._buf[:end]
        self._pending = None
        return Frame(frame_type, payload)

    def take_buffer(self) -> bytes:
        """Hand over the unparsed bytes (a protocol switch, e.g. handshake -> record layer)."""
        if self._pending is not None:
            raise MalformedMessageError("cannot hand over the buffer in the middle of a frame")
        data, self._buf = bytes(self._buf), bytearray()
        return data

    def _at_shortage(self) -> _Sentinel:
        if not self._eof:
            return NEED_DATA
        if self._buf:
            raise TruncatedStreamError(f"input ended inside a frame ({len(self._buf)} bytes left over)")
        return CLOSED

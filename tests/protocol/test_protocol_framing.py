import struct

import pytest

from migsec.errors import FrameTooLargeError, MalformedMessageError, TruncatedStreamError
from migsec.protocol.framing import (
    CLOSED,
    MIG_REQ,
    NEED_DATA,
    RECORD,
    RECORD_MAX,
    Frame,
    FrameDecoder,
    encode_frame,
    parse_header,
)


def test_frames_round_trip_byte_by_byte():
    frames = [encode_frame(MIG_REQ, b"hello"), encode_frame(RECORD, b""), encode_frame(RECORD, bytes(range(256)) * 10)]
    wire = b"".join(frames)
    dec = FrameDecoder()
    got = []
    for i in range(len(wire)):
        dec.receive_data(wire[i:i + 1])
        while (f := dec.next_frame()) is not NEED_DATA:
            got.append(f)
    assert got == [Frame(MIG_REQ, b"hello"), Frame(RECORD, b""), Frame(RECORD, bytes(range(256)) * 10)]
    dec.receive_data(b"")
    assert dec.next_frame() is CLOSED


def test_oversized_frame_refused_from_the_header_alone():
    dec = FrameDecoder()
    dec.receive_data(struct.pack(">BI", RECORD, RECORD_MAX + 1))  # header only, no body sent
    with pytest.raises(FrameTooLargeError, match="exceeds the maximum"):
        dec.next_frame()
    assert dec.buffered == 5  # nothing was allocated for the announced body


def test_oversized_control_frame_and_encoder_refuse():
    with pytest.raises(FrameTooLargeError):
        parse_header(struct.pack(">BI", MIG_REQ, 64 * 1024 + 1))
    with pytest.raises(FrameTooLargeError):
        encode_frame(MIG_REQ, b"x" * (64 * 1024 + 1))


def test_unknown_frame_type():
    dec = FrameDecoder()
    dec.receive_data(b"\x7f\x00\x00\x00\x01x")
    with pytest.raises(MalformedMessageError, match="unknown frame type 0x7f"):
        dec.next_frame()


def test_end_of_input_inside_a_frame_is_truncation():
    dec = FrameDecoder()
    dec.receive_data(encode_frame(MIG_REQ, b"abcdef")[:-2])
    assert dec.next_frame() is NEED_DATA
    dec.receive_data(b"")
    with pytest.raises(TruncatedStreamError):
        dec.next_frame()


def test_take_buffer_hands_over_following_bytes():
    dec = FrameDecoder()
    dec.receive_data(encode_frame(MIG_REQ, b"a") + b"\x10rest")
    assert dec.next_frame() == Frame(MIG_REQ, b"a")
    assert dec.take_buffer() == b"\x10rest"

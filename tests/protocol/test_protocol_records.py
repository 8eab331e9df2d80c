"""The record layer as a real two-party exchange: two RecordLayers joined by in-memory pipes."""
import hashlib
import os
import random
import struct

import pytest

from migsec.errors import (
    FrameTooLargeError,
    MalformedMessageError,
    NonceExhaustedError,
    ProtocolError,
    RecordAuthError,
    RecordSequenceError,
    TruncatedStreamError,
    UnexpectedMessageError,
)
from migsec.protocol.framing import HEADER_SIZE, NEED_DATA, RECORD, RECORD_MAX, parse_header
from migsec.protocol.records import (
    OVERHEAD,
    RECORD_SIZE,
    Ack,
    Close,
    Control,
    Data,
    End,
    Hole,
    RecordLayer,
)
from migsec.protocol.session import SessionKeys


def make_keys() -> SessionKeys:
    return SessionKeys("mig-1", os.urandom(32), os.urandom(32), os.urandom(32), "cloud-a.example", "cloud-b.example")


def pair(**kw):
    keys = make_keys()
    return RecordLayer(keys, "source", **kw), RecordLayer(keys, "destination", **kw)


def drain(layer: RecordLayer) -> list:
    events = []
    while (ev := layer.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


def split_frames(wire: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(wire):
        _t, n = parse_header(wire[i:i + HEADER_SIZE])
        out.append(wire[i:i + HEADER_SIZE + n])
        i += HEADER_SIZE + n
    return out


def test_64_mib_with_holes_and_acks_arrive_bit_identical():
    """64 MiB (random data with zero holes) through the zero-copy path, acked per record."""
    src, dst = pair()
    rng = random.Random(7)
    total = 64 * 1024 * 1024
    image = bytearray(os.urandom(total))
    holes = set(rng.sample(range(total // RECORD_SIZE), 8))
    for h in holes:
        image[h * RECORD_SIZE:(h + 1) * RECORD_SIZE] = bytes(RECORD_SIZE)
    sent_digest = hashlib.sha256(image).digest()

    out = bytearray(RECORD_SIZE + OVERHEAD)
    plain = bytearray(RECORD_SIZE)
    received = bytearray(total)  # the "disk" at B
    view = memoryview(image)
    for i in range(total // RECORD_SIZE):
        off = i * RECORD_SIZE
        if i in holes:
            frames = [src.send_hole(1, off, RECORD_SIZE)]
        else:
            n = src.seal_data_into(1, off, view[off:off + RECORD_SIZE], out)
            frames = [bytes(out[:n])]
        for frame in frames:
            ftype, length = parse_header(frame[:HEADER_SIZE])
            assert ftype == RECORD and length == len(frame) - HEADER_SIZE
            ev = dst.open_record_into(memoryview(frame)[HEADER_SIZE:], plain)
            if isinstance(ev, Data):
                received[ev.offset:ev.offset + len(ev.data)] = ev.data
            else:
                assert isinstance(ev, Hole)
                received[ev.offset:ev.offset + ev.length] = bytes(ev.length)
            src.receive_data(dst.send_ack(1, ev.offset + (ev.length if isinstance(ev, Hole) else len(ev.data))))
            assert isinstance(src.next_event(), Ack)
    dst.receive_data(src.send_end(1, total, sent_digest) + src.send_close())
    end, close = drain(dst)
    assert isinstance(end, End) and isinstance(close, Close)
    assert end.total_length == total and end.sha256 == hashlib.sha256(received).digest()
    assert received == image
    assert src.acked(1) == total


def test_sans_io_stream_with_channels_control_and_split_delivery():
    src, dst = pair()
    wire = b"".join([
        src.send_control(0, {"manifest": ["disk0", "memory"], "size": 5}),
        src.send_data(1, 0, b"hello"),
        src.send_data(2, 0, b"memory-image"),
        src.send_hole(1, 5, 4096),
        src.send_end(1, 4101, hashlib.sha256(b"hello" + bytes(4096)).digest()),
        src.send_end(2, 12, hashlib.sha256(b"memory-image").digest()),
        src.send_end(0, 0, hashlib.sha256(b"").digest()),
        src.send_close(),
    ])
    events = []
    for i in range(0, len(wire), 7):  # arbitrary TCP segmentation
        dst.receive_data(wire[i:i + 7])
        events += drain(dst)
    assert events[0] == Control(0, {"manifest": ["disk0", "memory"], "size": 5})
    assert events[1] == Data(1, 0, b"hello") and events[2] == Data(2, 0, b"memory-image")
    assert events[3] == Hole(1, 5, 4096)
    assert [type(e) for e in events[4:]] == [End, End, End, Close]
    assert dst.peer_closed and dst.open_channels() == []
    # the other direction works at the same time (acks and control from B)
    src.receive_data(dst.send_ack(1, 4101) + dst.send_control(9, {"state": "restored-paused"}))
    assert drain(src) == [Ack(1, 4101), Control(9, {"state": "restored-paused"})]


def _stream(src):
    return split_frames(b"".join(src.send_data(1, i * 10, bytes([i]) * 10) for i in range(4)))


@pytest.mark.parametrize("where", [HEADER_SIZE + 1, HEADER_SIZE + 20, HEADER_SIZE + 30, -1])
def test_tampered_record_is_refused_and_nothing_is_delivered(where):
    src, dst = pair()
    frames = _stream(src)
    bad = bytearray(frames[1])
    bad[where] ^= 0x01
    dst.receive_data(frames[0])
    assert drain(dst) == [Data(1, 0, bytes([0]) * 10)]
    dst.receive_data(bytes(bad))
    with pytest.raises((RecordAuthError, RecordSequenceError)) as info:
        dst.next_event()
    if where == HEADER_SIZE + 30 or where == -1:  # ciphertext / tag
        assert info.type is RecordAuthError
    # the layer is dead: even the genuine record is not accepted any more
    with pytest.raises(ProtocolError, match="ERROR state"):
        dst.receive_data(frames[1])
    with pytest.raises(ProtocolError, match="ERROR state"):
        dst.next_event()


def test_tampered_channel_or_offset_fails_authentication():
    src, dst = pair()
    frame = bytearray(_stream(src)[0])
    frame[HEADER_SIZE + 4] ^= 0x02  # channel id in the clear header
    dst.receive_data(bytes(frame))
    with pytest.raises(RecordAuthError):
        dst.next_event()


def test_reordered_records():
    src, dst = pair()
    f = _stream(src)
    dst.receive_data(f[0] + f[2])
    assert drain_until_error(dst, RecordSequenceError) == [Data(1, 0, bytes(10))]


def test_dropped_record():
    src, dst = pair()
    f = _stream(src)
    dst.receive_data(f[0] + f[1] + f[3])
    with pytest.raises(RecordSequenceError, match="missing"):
        drain(dst)


def test_duplicated_record():
    src, dst = pair()
    f = _stream(src)
    dst.receive_data(f[0] + f[1] + f[1])
    with pytest.raises(RecordSequenceError, match="duplicated"):
        drain(dst)


def test_record_from_the_wrong_direction_is_refused():
    """B's own records reflected back to B were sealed under the other key."""
    _src, dst = pair()
    dst.receive_data(dst.send_control(0, {"hi": 1}))
    with pytest.raises(RecordAuthError):
        dst.next_event()


def drain_until_error(layer, exc_type):
    got = []
    with pytest.raises(exc_type):
        while (ev := layer.next_event()) is not NEED_DATA:
            got.append(ev)
    return got


def test_truncated_stream_eof_without_close():
    src, dst = pair()
    dst.receive_data(src.send_data(1, 0, b"abc"))
    dst.receive_data(b"")
    with pytest.raises(TruncatedStreamError, match=r"without CLOSE; open channels: \[1\]"):
        drain(dst)


def test_truncated_stream_close_before_end():
    src, dst = pair()
    dst.receive_data(src.send_data(1, 0, b"abc") + src.send_close())
    with pytest.raises(TruncatedStreamError, match=r"channels \[1\] not ended"):
        drain(dst)


def test_truncated_mid_frame():
    src, dst = pair()
    dst.receive_data(src.send_data(1, 0, b"abcdef")[:-3])
    dst.receive_data(b"")
    with pytest.raises(TruncatedStreamError):
        drain(dst)


def test_oversized_frame_is_refused_before_allocation():
    src, dst = pair()
    dst.receive_data(struct.pack(">BI", RECORD, RECORD_MAX + 1))
    with pytest.raises(FrameTooLargeError):
        dst.next_event()
    with pytest.raises(ProtocolError):
        dst.next_event()


def test_sender_refuses_oversized_record():
    src, _ = pair()
    with pytest.raises(ProtocolError, match="DATA record must carry"):
        src.send_data(1, 0, bytes(RECORD_MAX))


def test_nonce_limit_stops_before_reuse():
    src, dst = pair(nonce_limit=3)
    wire = src.send_data(1, 0, b"a") + src.send_data(1, 1, b"b") + src.send_data(1, 2, b"c")
    with pytest.raises(NonceExhaustedError):
        src.send_data(1, 3, b"d")
    with pytest.raises(NonceExhaustedError):
        src.send_close()
    assert src.records_sent == 3
    dst.receive_data(wire)
    assert len(drain(dst)) == 3


def test_channel_rules_on_the_receiver():
    src, dst = pair()
    # a sender that follows the rules cannot produce these, so forge them with the real key:
    # data behind the stream position, and data after END
    frames = [src.send_data(1, 0, b"abcd")]
    src._sent[1].position = 0  # noqa: SLF001 - simulate a buggy or hostile sender
    frames.append(src.send_data(1, 2, b"zz"))
    dst.receive_data(b"".join(frames))
    with pytest.raises(RecordSequenceError, match="overlaps or precedes"):
        drain(dst)


def test_data_after_end_and_ack_beyond_sent():
    src, dst = pair()
    end = src.send_end(1, 0, hashlib.sha256(b"").digest())
    with pytest.raises(UnexpectedMessageError):
        src.send_data(1, 0, b"x")
    dst.receive_data(end)
    drain(dst)
    # an ACK for more than was sent is refused by the sender of the data
    src2, dst2 = pair()
    dst2.receive_data(src2.send_data(3, 0, b"abc"))
    drain(dst2)
    dst2._received[3].position = 100  # noqa: SLF001 - a lying receiver
    src2.receive_data(dst2.send_ack(3, 50))
    with pytest.raises(RecordSequenceError, match="does not match what was sent"):
        src2.next_event()


def test_sender_side_checks():
    src, dst = pair()
    with pytest.raises(ProtocolError, match="nothing received"):
        src.send_ack(1, 0)
    with pytest.raises(ProtocolError, match="32-byte"):
        src.send_end(1, 0, b"short")
    with pytest.raises(ProtocolError, match="channel must be"):
        src.send_data(-1, 0, b"x")
    with pytest.raises(ProtocolError, match="too small"):
        src.seal_data_into(1, 0, b"abc", bytearray(10))
    src.send_close()
    with pytest.raises(UnexpectedMessageError):
        src.send_data(1, 0, b"x")


def test_malformed_control_json_is_refused_after_authentication():
    src, dst = pair()
    # a valid record whose CONTROL body is not JSON: seal with the real key by hand
    frame = src._seal(3, 0, 0, 3, b"{x}")  # noqa: SLF001
    dst.receive_data(frame)
    with pytest.raises(MalformedMessageError):
        dst.next_event()


def test_repr_hides_keys():
    keys = make_keys()
    assert keys.a_to_b.hex() not in repr(keys) and "a_to_b" not in repr(keys)

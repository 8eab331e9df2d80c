"""The wire format as documented, rebuilt independently from migsec.crypto primitives.

These tests pin the byte layout another implementation would have to follow: a record
frame is ``0x10 | len u32 | header(type u8, channel u32, seq u64, offset u64, length u64)
| AES-256-GCM(key, 0^4 || seq, body, aad=header)``, and the traffic keys are
HKDF-SHA-256(ECDH, salt=transcript hash, info=canonical JSON of purpose, mid and DIDs).
"""
import hashlib
import os
import struct

from migsec.crypto import Aead, EphemeralKey, hkdf_sha256
from migsec.protocol.codec import canonical_json
from migsec.protocol.handshake import derive_session_keys, transcript_hash
from migsec.protocol.records import RecordLayer
from migsec.protocol.session import SessionKeys


def test_data_record_layout_matches_the_documented_construction():
    k_ab, k_ba = os.urandom(32), os.urandom(32)
    layer = RecordLayer(SessionKeys("m-9", k_ab, k_ba, bytes(32), "a.example", "b.example"), "source")
    layer.send_control(0, {"warm": "up"})  # seq 0
    payload = os.urandom(1000)
    frame = layer.send_data(7, 4096, payload)  # seq 1
    header = struct.pack(">BIQQQ", 1, 7, 1, 4096, len(payload))
    expected_body = Aead("aes-256-gcm", k_ab).seal(struct.pack(">IQ", 0, 1), payload, header)
    assert frame == struct.pack(">BI", 0x10, len(header) + len(expected_body)) + header + expected_body


def test_hole_and_ack_records_carry_only_a_tag():
    k_ab, k_ba = os.urandom(32), os.urandom(32)
    keys = SessionKeys("m-9", k_ab, k_ba, bytes(32), "a.example", "b.example")
    src, dst = RecordLayer(keys, "source"), RecordLayer(keys, "destination")
    frame = src.send_hole(3, 0, 1 << 30)
    header = struct.pack(">BIQQQ", 2, 3, 0, 0, 1 << 30)
    assert frame[5:34] == header and len(frame) == 5 + 29 + 16
    dst.receive_data(frame)
    dst.next_event()
    ack = dst.send_ack(3, 1 << 30)  # B's first record, under the b->a key
    ack_header = struct.pack(">BIQQQ", 5, 3, 0, 1 << 30, 0)
    assert ack[5:] == ack_header + Aead("aes-256-gcm", k_ba).seal(bytes(12), b"", ack_header)


def test_key_schedule_matches_the_documented_construction():
    ea, eb = EphemeralKey.generate("x25519"), EphemeralKey.generate("x25519")
    shared = ea.exchange(eb.public_bytes())
    assert shared == eb.exchange(ea.public_bytes())
    req, resp = b'{"t":"mig-req"}', b'{"t":"mig-resp"}'
    th = transcript_hash(req, resp)
    assert th == hashlib.sha256(b"migsec/v1 transcript\x00" + struct.pack(">I", len(req)) + req
                                + struct.pack(">I", len(resp)) + resp).digest()
    keys = derive_session_keys(shared, th, migration_id="m-1", src_did="a.example", dest_did="b.example",
                               resume_of=None)
    okm = hkdf_sha256(shared, salt=th, info=canonical_json(
        {"p": "migsec/v1 traffic", "mid": "m-1", "src": "a.example", "dest": "b.example"}), length=64)
    assert (keys.a_to_b, keys.b_to_a) == (okm[:32], okm[32:])
    # one more byte of transcript gives unrelated keys
    other = derive_session_keys(shared, transcript_hash(req + b" ", resp), migration_id="m-1",
                                src_did="a.example", dest_did="b.example", resume_of=None)
    assert other.a_to_b != keys.a_to_b and other.b_to_a != keys.b_to_a

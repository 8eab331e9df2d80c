"""The libvirt channel's commit prefix (migsec.protocol.rpcdigest): the same cut on both hosts,
whatever pieces the bytes came in."""
from __future__ import annotations

import hashlib
import random

import pytest

from migsec.protocol.libvirt_rpc import (
    KEEPALIVE_PROGRAM,
    PROC_CONNECT_CLOSE,
    PROC_CONNECT_OPEN,
    PROC_DOMAIN_MIGRATE_FINISH3_PARAMS,
    REMOTE_PROGRAM,
    Header,
    MessageType,
    Status,
    encode_packet,
)
from migsec.protocol.rpcdigest import RpcDigest


def packet(proc: int, mtype: MessageType, serial: int, *, status: Status = Status.OK, body: bytes = b"",
           prog: int = REMOTE_PROGRAM) -> bytes:
    return encode_packet(Header(prog, 1, proc, int(mtype), serial, int(status)), body)


PING = packet(1, MessageType.MESSAGE, 0, prog=KEEPALIVE_PROGRAM)


def feed(digest: RpcDigest, data: bytes, rng: random.Random, *, max_piece: int) -> None:
    pos = 0
    while pos < len(data):
        n = rng.randint(1, max_piece)
        digest.update(memoryview(data)[pos:pos + n])
        pos += n


@pytest.mark.parametrize("max_piece", [1, 3, 29, 4096, 1 << 20])
def test_the_call_direction_is_cut_at_the_end_of_finish3_however_it_is_split(max_piece):
    before = (PING + packet(PROC_CONNECT_OPEN, MessageType.CALL, 1, body=b"qemu:///system\0\0")
              + packet(PROC_DOMAIN_MIGRATE_FINISH3_PARAMS, MessageType.CALL, 7, body=bytes(range(200)) * 50))
    after = PING + packet(PROC_CONNECT_CLOSE, MessageType.CALL, 8)
    d = RpcDigest(MessageType.CALL)
    cuts = []
    d.on_cut = cuts.append
    feed(d, before + after, random.Random(max_piece), max_piece=max_piece)
    assert d.digest() == hashlib.sha256(before + after).digest()
    assert d.cut is not None and cuts == [d.cut]
    assert d.cut.offset == len(before) and d.cut.ok
    assert d.cut.digest == hashlib.sha256(before).digest()


def test_the_reply_direction_is_cut_at_finish3s_reply_and_says_whether_it_succeeded():
    call_only = packet(PROC_DOMAIN_MIGRATE_FINISH3_PARAMS, MessageType.CALL, 7)
    for status, ok in ((Status.OK, True), (Status.ERROR, False)):
        stream = (packet(PROC_CONNECT_OPEN, MessageType.REPLY, 1) + call_only
                  + packet(PROC_DOMAIN_MIGRATE_FINISH3_PARAMS, MessageType.REPLY, 7, status=status, body=b"x" * 12))
        d = RpcDigest(MessageType.REPLY)
        d.update(stream + PING)
        assert d.cut is not None and d.cut.ok is ok
        assert d.cut.offset == len(stream) and d.cut.digest == hashlib.sha256(stream).digest()


def test_only_the_first_finish3_cuts_and_other_programs_never_do():
    first = (packet(PROC_DOMAIN_MIGRATE_FINISH3_PARAMS, MessageType.CALL, 1, prog=KEEPALIVE_PROGRAM)
             + packet(PROC_DOMAIN_MIGRATE_FINISH3_PARAMS, MessageType.CALL, 2))
    d = RpcDigest(MessageType.CALL)
    d.update(first + packet(PROC_DOMAIN_MIGRATE_FINISH3_PARAMS, MessageType.CALL, 3))
    assert d.cut is not None and d.cut.offset == len(first)


def test_bytes_that_are_not_libvirt_framing_get_no_cut_but_are_still_hashed():
    junk = b"\x00\x00\x00\x05hello" + packet(PROC_DOMAIN_MIGRATE_FINISH3_PARAMS, MessageType.CALL, 1)
    d = RpcDigest(MessageType.CALL)
    d.update(junk)
    assert d.lost and d.cut is None
    assert d.digest() == hashlib.sha256(junk).digest()
    with pytest.raises(ValueError):
        RpcDigest(MessageType.STREAM)

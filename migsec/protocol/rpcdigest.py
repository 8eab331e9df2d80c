"""SHA-256 of one direction of a live move's libvirt RPC channel, and of its commit prefix.

A live move commits while libvirt's RPC connection between the two libvirtds is still
open: after B's Finish3 reply, A's libvirtd runs its Confirm (stopping the source QEMU)
and only then unregisters its close callback and closes the connection. B's receipt must
be signed before that, so for the libvirt channel it vouches for a prefix both hosts can
cut at the same byte without agreeing on timing: each direction up to the end of the
first DOMAIN_MIGRATE_FINISH3_PARAMS packet in it (A -> B the call, B -> A its reply).
Everything of the migration (the Prepare and Finish calls with their XML, params and
cookies) is in that prefix; after it come only the close callback, CONNECT_CLOSE and
keepalives, which the record layer's END (length + SHA-256 of the whole direction,
checked by the receiver) still covers and both ledgers record.

``RpcDigest`` is fed the direction's bytes in any pieces (``update``), like ``hashlib``;
it frames libvirt's packets (``length u32`` counting itself, then the header) only until
the cut is found, so its cost after that is the hash alone.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

from migsec.protocol.libvirt_rpc import HEADER, LENGTH, MIN_PACKET, PROC_DOMAIN_MIGRATE_FINISH3_PARAMS, \
    REMOTE_PROGRAM, MessageType, Status

CUT_SUFFIX = "@finish3"  # the receipt's name for a channel direction's commit prefix
MAX_FRAMED = 64 * 1024 * 1024  # a packet length beyond this: not libvirt's framing, stop looking


@dataclass(frozen=True)
class Cut:
    """The end of the Finish3 packet in this direction: its offset, the digest of all bytes
    up to it, and (for the reply) whether libvirt's Finish succeeded."""

    offset: int
    digest: bytes
    ok: bool


class RpcDigest:
    """``hashlib``-like SHA-256 of a libvirt RPC byte stream that also keeps the ``cut``:
    the digest at the end of the first Finish3 packet of ``kind`` (CALL or REPLY)."""

    def __init__(self, kind: MessageType) -> None:
        if kind not in (MessageType.CALL, MessageType.REPLY):
            raise ValueError("the cut is at Finish3's call or reply")
        self._kind = kind
        self._sha = hashlib.sha256()
        self.offset = 0
        self.cut: Cut | None = None
        self.lost = False  # the stream stopped looking like libvirt's framing: no cut
        self._head = bytearray()  # the current packet's first MIN_PACKET bytes
        self._left = 0  # bytes of the current packet still to come after its head
        self.on_cut: Callable[[Cut], None] | None = None  # called once, in the updating thread

    def digest(self) -> bytes:
        return self._sha.digest()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view and self.cut is None and not self.lost:
            if self._left == 0 and len(self._head) < MIN_PACKET:
                take = min(MIN_PACKET - len(self._head), len(view))
                self._head += view[:take]
                self._eat(view[:take])
                view = view[take:]
                if len(self._head) == MIN_PACKET:
                    (length,) = LENGTH.unpack_from(self._head, 0)
                    if not MIN_PACKET <= length <= MAX_FRAMED:
                        self.lost = True
                    else:
                        self._left = length - MIN_PACKET
                        if self._left == 0:
                            self._packet_end()
                continue
            take = min(self._left, len(view))
            self._eat(view[:take])
            view = view[take:]
            self._left -= take
            if self._left == 0:
                self._packet_end()
        if view:
            self._eat(view)

    def _eat(self, view: memoryview) -> None:
        self._sha.update(view)
        self.offset += len(view)

    def _packet_end(self) -> None:
        prog, _vers, proc, mtype, _serial, status = HEADER.unpack_from(self._head, LENGTH.size)
        self._head.clear()
        if prog == REMOTE_PROGRAM and proc == PROC_DOMAIN_MIGRATE_FINISH3_PARAMS and mtype == self._kind:
            ok = self._kind == MessageType.CALL or status == Status.OK
            self.cut = Cut(self.offset, self._sha.copy().digest(), ok)
            if self.on_cut is not None:
                self.on_cut(self.cut)

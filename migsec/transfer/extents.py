"""Sparse-aware reading of VM images and the canonical stream digest.

A stream is cut into fixed blocks of ``BLOCK`` bytes (the last one may be short).
A block that is all zero -- whether the file system stores it as a hole or as
written zeros -- is a *hole block* and is never sent or hashed byte by byte.

Stream digest (``migsec-stream-digest-v1``): SHA-256 over
``b"migsec-stream-digest-v1\\0" || u32(BLOCK)``, then for each maximal run of hole
blocks ``b"Z" || u64(number of blocks)``, for each data block ``b"D" || bytes``,
and finally ``b"E" || u64(size)``. It is a function of the logical content only
(not of chunking, record size or which holes the file system kept), so source and
destination can compute it independently, and holes cost nothing: hashing the
zeros of a 2 GiB disk with 300 MiB written would otherwise triple the SHA-256 work,
the most expensive step per byte (FACTS.md). Both sides compute it by *reading
the file*: the source from the image it sends, the destination from the staging
file it wrote (never from the records it was handed).
"""
from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from typing import NamedTuple

from migsec.errors import TransferError

BLOCK = 64 * 1024
READ_SIZE = 1024 * 1024  # a multiple of BLOCK
DIGEST_NAME = "migsec-stream-digest-v1"
_ZERO_BLOCK = bytes(BLOCK)
_U64 = struct.Struct(">Q")


class Extent(NamedTuple):
    """A maximal run of data or hole blocks: ``kind`` is ``"data"`` or ``"hole"``."""

    kind: str
    offset: int
    length: int


def is_zero(buf: bytearray | bytes, start: int, length: int) -> bool:
    """True when ``buf[start:start+length]`` is all zero bytes."""
    # Probe both ends first: random data exits without copying the block.
    if buf[start] or buf[start + length - 1]:
        return False
    return buf[start:start + length] == (_ZERO_BLOCK if length == BLOCK else bytes(length))


def fs_data_regions(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, end) regions the file system reports as data, widened to BLOCK bounds."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to EOF
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no sparse support: all data
                yield pos, end
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        lo = max(pos, data - data % BLOCK)
        hi = min(end, -(-hole // BLOCK) * BLOCK)
        yield lo, hi
        pos = hi


def scan_blocks(fd: int, start: int, end: int, buf: bytearray | None = None
                ) -> Iterator[tuple[str, int, int, memoryview | None]]:
    """Yield ("data", off, len, view) and ("hole", off, len, None) pieces of [start, end).

    ``start`` must be BLOCK-aligned. Pieces follow BLOCK boundaries; a data piece is
    at most READ_SIZE long and its view is only valid until the next item.
    """
    if start % BLOCK:
        raise TransferError(f"scan offset {start} is not a multiple of {BLOCK}")
    buf = buf if buf is not None else bytearray(READ_SIZE)
    view = memoryview(buf)
    pos = start
    for lo, hi in fs_data_regions(fd, start, end):
        if lo > pos:
            yield "hole", pos, lo - pos, None
        pos = lo
        while pos < hi:
            want = min(READ_SIZE, hi - pos)
            got = os.preadv(fd, [view[:want]], pos)
            if got != want:
                raise TransferError(f"short read at offset {pos}: file shrank while reading")
            run_kind, run_start = "", 0  # "": no run yet
            for b in range(0, got, BLOCK):
                n = min(BLOCK, got - b)
                kind = "hole" if is_zero(buf, b, n) else "data"
                if kind != run_kind:
                    if run_kind:
                        yield run_kind, pos + run_start, b - run_start, (
                            view[run_start:b] if run_kind == "data" else None)
                    run_kind, run_start = kind, b
            yield run_kind, pos + run_start, got - run_start, (
                view[run_start:got] if run_kind == "data" else None)
            pos += got
    if pos < end:
        yield "hole", pos, end - pos, None


def iter_extents(path: str | os.PathLike[str]) -> Iterator[Extent]:
    """Maximal data and hole extents of a file (SEEK_DATA/SEEK_HOLE + all-zero blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise TransferError(f"cannot open {os.fspath(path)!r}: {exc.strerror}") from exc
    try:
        size = os.lseek(fd, 0, os.SEEK_END)  # also right for block devices
        current: Extent | None = None
        for kind, off, length, _ in scan_blocks(fd, 0, size):
            if current is not None and current.kind == kind:
                current = Extent(kind, current.offset, current.length + length)
                continue
            if current is not None:
                yield current
            current = Extent(kind, off, length)
        if current is not None:
            yield current
    finally:
        os.close(fd)


class StreamDigest:
    """Incremental ``migsec-stream-digest-v1``; feed pieces in order, BLOCK-aligned."""

    __slots__ = ("_sha", "_pos", "_zero_blocks", "_short")

    def __init__(self) -> None:
        self._sha = hashlib.sha256(DIGEST_NAME.encode() + b"\0" + struct.pack(">I", BLOCK))
        self._pos = 0
        self._zero_blocks = 0
        self._short = False  # a short (final) block was fed: nothing may follow

    @property
    def position(self) -> int:
        return self._pos

    def _check(self, offset: int, length: int) -> None:
        if offset != self._pos or self._short:
            raise TransferError(f"digest fed at {offset}, expected {self._pos}")
        if length % BLOCK:
            self._short = True

    def _flush_zeros(self) -> None:
        if self._zero_blocks:
            self._sha.update(b"Z" + _U64.pack(self._zero_blocks))
            self._zero_blocks = 0

    def data(self, offset: int, view: memoryview | bytes) -> None:
        """Feed data blocks (the caller has classified them as not all-zero)."""
        self._check(offset, len(view))
        self._flush_zeros()
        update = self._sha.update
        for b in range(0, len(view), BLOCK):
            update(b"D")
            update(view[b:b + BLOCK])
        self._pos += len(view)

    def hole(self, offset: int, length: int) -> None:
        """Feed all-zero blocks."""
        self._check(offset, length)
        self._zero_blocks += -(-length // BLOCK)
        self._pos += length

    def feed_file(self, fd: int, end: int, buf: bytearray | None = None, *,
                  stop: threading.Event | None = None) -> None:
        """Read ``fd`` from the current position up to ``end`` and feed it (until ``stop`` is set)."""
        if end <= self._pos:
            return
        for kind, off, length, view in scan_blocks(fd, self._pos, end, buf):
            if stop is not None and stop.is_set():
                return
            if kind == "data":
                assert view is not None  # scan_blocks gives every data piece its view
                self.data(off, view)
            else:
                self.hole(off, length)

    def hexdigest(self) -> str:
        """Finish with the stream size; the object must not be fed afterwards."""
        self._flush_zeros()
        sha = self._sha.copy()
        sha.update(b"E" + _U64.pack(self._pos))
        return sha.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """The stream digest of a whole file (for tests, tools and recovery)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = StreamDigest()
        digest.feed_file(fd, os.lseek(fd, 0, os.SEEK_END))
        return digest.hexdigest()
    finally:
        os.close(fd)


def bytes_digest(data: bytes) -> str:
    """The stream digest of an in-memory stream (domain XML, manifest)."""
    digest = StreamDigest()
    view = memoryview(data)
    for b in range(0, len(data), BLOCK):
        n = min(BLOCK, len(data) - b)
        if is_zero(data, b, n):
            digest.hole(b, n)
        else:
            digest.data(b, view[b:b + n])
    return digest.hexdigest()

"""What the source sends: stream descriptions and sparse-aware readers."""
from __future__ import annotations

import errno
import os
import re
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from migsec.errors import TransferError
from migsec.transfer.extents import BLOCK, READ_SIZE, StreamDigest, is_zero, scan_blocks

KINDS = ("xml", "disk", "memory", "manifest")
MAX_CHANNEL = 0xFFFF
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")


def _size(fd: int) -> int:
    """Size of a regular file or of a block device (an LVM or iSCSI disk has st_size 0)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file or block device")
    return st.st_size


@dataclass(frozen=True)
class StreamSpec:
    """One stream as both sides agree on it before data flows.

    ``target`` is the destination's final path; the destination sets it from its own
    storage mapping, never from what the source proposes.
    """

    channel: int
    name: str
    kind: str
    size: int
    target: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.channel, int) or not 1 <= self.channel <= MAX_CHANNEL:
            raise TransferError(f"stream channel must be 1..{MAX_CHANNEL}, got {self.channel!r}")
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise TransferError(f"stream name {self.name!r} is not a plain name (letters, digits, ._:@+-)")
        if self.kind not in KINDS:
            raise TransferError(f"stream {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if not isinstance(self.size, int) or self.size < 0:
            raise TransferError(f"stream {self.name!r}: size {self.size!r} is not a byte count")


class StreamSource:
    """A stream to send, from a file (sparse-aware) or from bytes.

    The stream digest is computed by a background thread reading the file through its
    own descriptor (hashlib releases the GIL, so it overlaps encryption and sending).
    """

    def __init__(self, channel: int, name: str, kind: str, *,
                 path: str | os.PathLike[str] | None = None, data: bytes | None = None,
                 target: str = "") -> None:
        if (path is None) == (data is None):
            raise TransferError(f"stream {name!r}: give exactly one of path or data")
        self.path = os.fspath(path) if path is not None else None
        self.data = bytes(data) if data is not None else None
        if self.path is not None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    size = _size(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise TransferError(f"stream {name!r}: cannot open {self.path!r}: {exc.strerror}") from exc
        else:
            size = len(self.data)  # type: ignore[arg-type]
        self.spec = StreamSpec(channel, name, kind, size, target)
        self._digest: str | None = None
        self._digest_state: StreamDigest | None = None
        self._allocated = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def channel(self) -> int:
        return self.spec.channel

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def size(self) -> int:
        return self.spec.size

    def start_digest(self) -> None:
        """Start hashing in the background (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._hash, name=f"digest-{self.name}", daemon=True)
            self._thread.start()

    def _hash(self) -> None:
        try:
            digest = self._digest_state = StreamDigest()
            if self.data is not None:
                self._digest_pieces(digest, self._bytes_pieces(0))
            else:
                fd = self._open()
                try:
                    self._digest_pieces(digest, scan_blocks(fd, 0, self.size))
                finally:
                    os.close(fd)
            self._digest = digest.hexdigest()
        except BaseException as exc:  # reported by digest()
            self._error = exc

    def _digest_pieces(self, digest: StreamDigest, pieces: Iterable[tuple[str, int, int, Any]]) -> None:
        for kind, off, length, view in pieces:
            if kind == "data":
                digest.data(off, view)
                self._allocated += length
            else:
                digest.hole(off, length)

    @property
    def hashed(self) -> int:
        """How far the background hash has got (bytes of the stream)."""
        return self._digest_state.position if self._digest_state is not None else 0

    @property
    def digest_ready(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def digest(self) -> tuple[str, int]:
        """Wait for the background hash: (stream digest hex, allocated data bytes)."""
        self.start_digest()
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            if isinstance(self._error, TransferError):
                raise self._error
            raise TransferError(f"stream {self.name!r}: hashing failed: {self._error}") from self._error
        assert self._digest is not None
        return self._digest, self._allocated

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY)  # type: ignore[arg-type]
        except OSError as exc:
            raise TransferError(f"stream {self.name!r}: cannot open {self.path!r}: {exc.strerror}") from exc

    def _bytes_pieces(self, start: int) -> Iterator[tuple[str, int, int, memoryview | None]]:
        data = self.data
        assert data is not None
        view = memoryview(data)
        for b in range(start, len(data), BLOCK):
            n = min(BLOCK, len(data) - b)
            if is_zero(data, b, n):
                yield "hole", b, n, None
            else:
                yield "data", b, n, view[b:b + n]

    def pieces(self, start: int = 0, buf: bytearray | None = None
               ) -> Iterator[tuple[str, int, int, memoryview | None]]:
        """Yield ("data", offset, length, view) / ("hole", offset, length, None) from ``start``.

        ``start`` (a resume offset) must be BLOCK-aligned or the stream size. A data view
        is valid only until the next item; data pieces are at most READ_SIZE long.
        """
        if start == self.size:
            return
        if not 0 <= start < self.size or start % BLOCK:
            raise TransferError(f"stream {self.name!r}: cannot resume at offset {start} (size {self.size})")
        if self.data is not None:
            yield from self._bytes_pieces(start)
            return
        fd = self._open()
        try:
            if _size(fd) != self.size:
                raise TransferError(f"stream {self.name!r}: {self.path!r} changed size since it was described")
            yield from scan_blocks(fd, start, self.size, buf if buf is not None else bytearray(READ_SIZE))
        finally:
            os.close(fd)

"""What the source sends: stream descriptions and sparse-aware readers."""
from __future__ import annotations

import errno
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

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
    storage mapping, never from what the source proposes. A ``growing`` stream is
    still being written at the source: ``size`` is then only its upper bound, and
    its END record gives the real size.
    """

    channel: int
    name: str
    kind: str
    size: int
    target: str = ""
    growing: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.channel, int) or not 1 <= self.channel <= MAX_CHANNEL:
            raise TransferError(f"stream channel must be 1..{MAX_CHANNEL}, got {self.channel!r}")
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise TransferError(f"stream name {self.name!r} is not a plain name (letters, digits, ._:@+-)")
        if self.kind not in KINDS:
            raise TransferError(f"stream {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if not isinstance(self.size, int) or self.size < 0:
            raise TransferError(f"stream {self.name!r}: size {self.size!r} is not a byte count")
        if not isinstance(self.growing, bool):
            raise TransferError(f"stream {self.name!r}: growing must be true or false")


class _BackgroundDigest:
    """The stream digest of a source, computed by a background thread.

    The thread walks the source's own pieces (``_digest_walk``) through its own
    descriptor; hashlib releases the GIL, so hashing overlaps encryption and sending.
    """

    @property
    def name(self) -> str:
        raise NotImplementedError

    def _init_digest(self) -> None:
        self._digest: str | None = None
        self._digest_state: StreamDigest | None = None
        self._allocated = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _digest_walk(self) -> Generator[tuple[str, int, int, Any], None, None]:
        """The pieces to hash, from offset 0 (runs in the digest thread)."""
        raise NotImplementedError

    def start_digest(self) -> None:
        """Start hashing in the background (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._hash, name=f"digest-{self.name}", daemon=True)
            self._thread.start()

    def _hash(self) -> None:
        try:
            digest = self._digest_state = StreamDigest()
            pieces = self._digest_walk()
            try:
                for kind, off, length, view in pieces:
                    if kind == "data":
                        digest.data(off, view)
                        self._allocated += length
                    elif kind == "hole":
                        digest.hole(off, length)
                    # a growing source's "wait" adds nothing to the digest
            finally:
                pieces.close()  # on an error mid-walk, close the descriptor now, not at GC
            self._digest = digest.hexdigest()
        except BaseException as exc:  # reported by digest()
            self._error = exc

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


class StreamSource(_BackgroundDigest):
    """A stream to send, from a file (sparse-aware) or from bytes."""

    growing = False

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
        self._init_digest()

    @property
    def channel(self) -> int:
        return self.spec.channel

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def bound(self) -> int:
        """The size the stream is opened with: its size (only a growing source differs)."""
        return self.spec.size

    def _digest_walk(self) -> Generator[tuple[str, int, int, Any], None, None]:
        if self.data is not None:
            yield from self._bytes_pieces(0)
            return
        fd = self._open()
        try:
            yield from scan_blocks(fd, 0, self.size)
        finally:
            os.close(fd)

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


class Writer(Protocol):
    """Who writes a growing file: whether it finished, and how."""

    def finished(self) -> bool: ...

    def error(self) -> BaseException | None: ...


class WriterOutcome:
    """A ``Writer`` whose work runs through ``record(fn)`` (in the writer's own thread)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    def record(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` and keep how it ended; never raises."""
        try:
            fn()
        except BaseException as exc:  # reported by error()
            self._error = exc
        finally:
            self._done.set()

    def finished(self) -> bool:
        return self._done.is_set()

    def error(self) -> BaseException | None:
        """What ``fn`` raised, once it finished (None while running or after success)."""
        return self._error if self._done.is_set() else None


FOLLOW_POLL_S = 0.005  # how often a follower looks for new data while the writer writes
STALL_S = 600.0  # a writer that adds nothing for this long is taken for hung


class GrowingFileSource(_BackgroundDigest):
    """A file another process is still writing front to back (libvirt's save image).

    The body is sent as it appears, in whole ``BLOCK``s (so every resume point stays
    aligned) and the tail once the writer finished. A writer may rewrite its first
    bytes when it finishes (libvirt turns the magic ``LibvirtQemudPart`` into
    ``LibvirtQemudSave``): ``head=(while_writing, final)`` names that rewrite, and
    the block is sent and hashed with ``final`` already in place. After the writer
    finished, the file's first block must equal what was sent, else the stream
    fails; so the END digest is that of the final file. A failed writer fails the
    stream, and nothing before it is ever ENDed. The digest is computed by a thread
    that follows the file too, so hashing overlaps the writer and the sending.

    ``complete_on_final_head``: the head rewrite is the writer's last write to the
    file, so the file is complete once the head, seen as ``while_writing`` before,
    reads ``final``, even before the writer returns (libvirt rewrites the magic as soon as QEMU's stream is written,
    then spends a second or more stopping QEMU). The caller must still see the
    writer succeed before it commits to the copy (the daemon does, before its decision).
    """

    growing = True

    def __init__(self, channel: int, name: str, kind: str, path: str | os.PathLike[str], *,
                 writer: Writer, max_size: int, head: tuple[bytes, bytes] | None = None,
                 complete_on_final_head: bool = False, target: str = "") -> None:
        if head is not None and (len(head[0]) != len(head[1]) or not 0 < len(head[1]) <= BLOCK):
            raise TransferError(f"stream {name!r}: head rewrite must keep the length (1..{BLOCK} bytes)")
        if complete_on_final_head and head is None:
            raise TransferError(f"stream {name!r}: complete_on_final_head needs a head rewrite")
        self.complete_on_final_head = complete_on_final_head
        self._saw_partial_head = False
        self.path = os.fspath(path)
        self.data = None
        self.writer = writer
        self.head = head
        self._bound = StreamSpec(channel, name, kind, max_size, target, growing=True)
        self._final_size: int | None = None
        self._init_digest()

    @property
    def spec(self) -> StreamSpec:
        """The upper bound while growing; the real size once the writer finished."""
        if self._final_size is None:
            return self._bound
        return replace(self._bound, size=self._final_size, growing=False)

    @property
    def channel(self) -> int:
        return self._bound.channel

    @property
    def name(self) -> str:
        return self._bound.name

    @property
    def size(self) -> int:
        """The final size; before the writer finished, the bound."""
        return self.spec.size

    @property
    def bound(self) -> int:
        """The most the file may grow to (the size the stream is opened with)."""
        return self._bound.size

    @property
    def final(self) -> bool:
        return self._final_size is not None

    # ---- following the file ---------------------------------------------------------------
    def _writer_outcome(self) -> bool:
        """Whether the writer finished; raises when it failed."""
        if not self.writer.finished():
            return False
        error = self.writer.error()
        if error is not None:
            raise TransferError(f"stream {self.name!r}: writing {self.path!r} failed, "
                                f"so the partial stream is abandoned: {error}") from error
        return True

    def _open_when_created(self) -> int:
        while True:
            finished = self._writer_outcome()
            try:
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if finished:
                    raise TransferError(f"stream {self.name!r}: the writer finished but "
                                        f"{self.path!r} does not exist") from None
            except OSError as exc:
                raise TransferError(f"stream {self.name!r}: cannot open {self.path!r}: {exc.strerror}") from exc
            time.sleep(FOLLOW_POLL_S)

    def _head_is_final(self, fd: int) -> bool:
        """With ``complete_on_final_head``: the writer's last write (the head rewrite) is done."""
        # Only a flip that was seen counts: a file that carries the final head from the
        # start (another writer version) is complete only when its writer says so.
        if not self.complete_on_final_head or not self._saw_partial_head:
            return False
        final = self.head[1]  # type: ignore[index]
        return os.pread(fd, len(final), 0) == final

    def _patch_head(self, off: int, view: memoryview, sent_head: bytearray) -> None:
        if off != 0:
            return
        n = len(self.head[1]) if self.head is not None else 0
        if self.head is not None:
            if len(view) < n:
                raise TransferError(f"stream {self.name!r}: {self.path!r} is shorter than its header")
            now = bytes(view[:n])
            if now == self.head[0]:
                self._saw_partial_head = True
            if now not in self.head:
                raise TransferError(f"stream {self.name!r}: {self.path!r} starts with {now[:16]!r}, "
                                    f"not the expected {self.head[0][:16]!r}")
            view[:n] = self.head[1]
        sent_head[:] = view[:BLOCK]

    def _follow(self, start: int, buf: bytearray) -> Generator[tuple[str, int, int, memoryview | None], None, None]:
        """Pieces from ``start`` as the file grows; ("wait", pos, 0, None) while nothing is new."""
        fd = self._open_when_created()
        try:
            pos, last_growth = start, time.monotonic()
            # from a resume offset the head went out in an earlier attempt; the digest
            # thread, which always starts at 0, checks it then
            sent_head: bytearray | None = bytearray() if start == 0 else None
            while True:
                # before the size: a size seen after it is final
                finished = self._writer_outcome() or self._head_is_final(fd)
                size = os.fstat(fd).st_size
                if size > self._bound.size:
                    raise TransferError(f"stream {self.name!r}: {self.path!r} grew past "
                                        f"{self._bound.size} bytes, the most the destination accepts")
                end = size if finished else size - size % BLOCK
                if end > pos:
                    for piece in scan_blocks(fd, pos, end, buf):
                        if piece[0] == "data" and sent_head is not None:
                            self._patch_head(piece[1], piece[3], sent_head)  # type: ignore[arg-type]
                        elif piece[1] == 0 and self.head is not None:
                            raise TransferError(f"stream {self.name!r}: {self.path!r} starts with zeros, "
                                                f"not the expected {self.head[0][:16]!r}")
                        yield piece
                    pos, last_growth = end, time.monotonic()
                elif finished:
                    if size < pos:
                        raise TransferError(f"stream {self.name!r}: {self.path!r} shrank to {size} "
                                            f"bytes after {pos} were sent")
                    if sent_head:
                        final = os.pread(fd, len(sent_head), 0)
                        if final != sent_head:
                            raise TransferError(f"stream {self.name!r}: the writer changed the head of "
                                                f"{self.path!r} in a way that was not announced")
                    self._final_size = size
                    return
                else:
                    if time.monotonic() - last_growth > STALL_S:
                        raise TransferError(f"stream {self.name!r}: {self.path!r} did not grow for "
                                            f"{STALL_S:.0f} s")
                    yield "wait", pos, 0, None
                    time.sleep(FOLLOW_POLL_S)
        finally:
            os.close(fd)

    def pieces(self, start: int = 0, buf: bytearray | None = None
               ) -> Iterator[tuple[str, int, int, memoryview | None]]:
        """As ``StreamSource.pieces``, plus ("wait", pos, 0, None) while the writer is behind.

        The generator ends once the writer finished and everything was yielded; then
        ``size`` is final. It raises TransferError when the writer failed.
        """
        if start % BLOCK:
            raise TransferError(f"stream {self.name!r}: cannot resume at unaligned offset {start}")
        yield from self._follow(start, buf if buf is not None else bytearray(READ_SIZE))

    # ---- the digest ---------------------------------------------------------------------------
    def _digest_walk(self) -> Generator[tuple[str, int, int, Any], None, None]:
        # the digest thread follows the file too, so hashing overlaps the writer
        return self._follow(0, bytearray(READ_SIZE))


Source = StreamSource | GrowingFileSource
"""What ``send_streams`` sends: a stream of known size, or a file still being written."""

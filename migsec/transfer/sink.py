"""Where the destination writes: staged, sparse, verified, resumable streams.

A :class:`Staging` directory holds ``state.json`` with the durably written
("acknowledged") offset of each stream, and one ``ch<N>.part`` file per stream without
a target. A stream with a target (a disk) is staged *beside its target*, as
``.migsec-<staging dir name>.ch<N>.part`` in the target's directory: commit's rename
then never crosses file systems (the images usually live on another mount than the
state directory), and a part file is named by migration and channel, never by a
peer-chosen name. A part file is pre-sized with ftruncate,
so hole extents are never written; on reopen everything past the acknowledged
offset is cut away (truncate down, then up), so stale data from an earlier attempt
cannot survive in a region the sender now marks as a hole.

Each sink hashes what it *wrote*: a verifier thread reads the part file back up to
the last checkpoint (after fdatasync), and at END the rest, then compares with the
digest the source announced.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import replace

from migsec.errors import (
    IntegrityError,
    ResumeError,
    TransferError,
    TruncatedStreamError,
)
from migsec.fsutil import atomic_write, fsync_dir
from migsec.transfer.extents import BLOCK, READ_SIZE, StreamDigest
from migsec.transfer.source import StreamSpec

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1
PART_PREFIX = ".migsec-"


def part_path(directory: str, spec: StreamSpec) -> str:
    """Where ``spec``'s data is staged: beside its target (same file system), else in ``directory``."""
    if spec.target:
        target = os.path.abspath(spec.target)
        name = f"{PART_PREFIX}{os.path.basename(os.path.abspath(directory))}.ch{spec.channel}.part"
        return os.path.join(os.path.dirname(target), name)
    return os.path.join(directory, f"ch{spec.channel}.part")


class StreamSink:
    """Writes one stream at increasing offsets into its part file."""

    def __init__(self, spec: StreamSpec, path: str, acked: int, done: bool, digest: str | None) -> None:
        self.spec = spec
        self.path = path
        self.acked = acked
        self.frontier = acked
        self.done = done
        self.digest = digest
        self._fd = -1
        self._lock = threading.Lock()  # the fd is shared with the data plane's syncer thread
        self._vlock = threading.Lock()
        self._stopping = threading.Event()
        self._verifier: threading.Thread | None = None
        self._targets: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._hash = StreamDigest()
        self._hash_error: BaseException | None = None
        if not done:
            self._open()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def verified(self) -> int:
        """How far the read-back hash has got."""
        return self._hash.position

    def wait_verifier(self, lag: int) -> None:
        """Block while the read-back hash is more than ``lag`` bytes behind what is durable,
        so it cannot pile up into a long stall at END (SHA-256 may be slower than the link)."""
        while (self.acked - self._hash.position > lag and self._hash_error is None
               and self._verifier is not None and self._verifier.is_alive()):
            time.sleep(0.005)

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            # Cut away anything not acknowledged, then re-extend: the tail becomes a hole.
            os.ftruncate(self._fd, self.acked)
            os.ftruncate(self._fd, self.spec.size)
        except OSError as exc:
            raise TransferError(f"stream {self.name!r}: cannot prepare {self.path!r}: {exc.strerror}") from exc

    def _start_verifier(self) -> None:
        # Started on first use, so that reopening a staging directory only to discard it
        # does not read back a large prefix first.
        with self._vlock:
            if self._verifier is None:
                self._verifier = threading.Thread(target=self._verify_loop, name=f"verify-{self.name}",
                                                  daemon=True)
                self._verifier.start()
                if self.acked:
                    self._targets.put(self.acked)  # recompute the digest state of the kept prefix

    def _verify_loop(self) -> None:
        buf = bytearray(READ_SIZE)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._hash_error = exc
            return
        try:
            while (target := self._targets.get()) is not None:
                if self._hash_error is None and not self._stopping.is_set():
                    self._hash.feed_file(fd, target, buf, stop=self._stopping)
        except BaseException as exc:  # reported at end()
            self._hash_error = exc
        finally:
            os.close(fd)

    def _check_range(self, offset: int, length: int) -> None:
        if self.done:
            raise TransferError(f"stream {self.name!r}: record after END")
        if offset != self.frontier:
            raise ResumeError(f"stream {self.name!r}: record at offset {offset}, expected {self.frontier}")
        if length < 0 or offset + length > self.spec.size:
            raise TransferError(f"stream {self.name!r}: extent {offset}+{length} beyond size {self.spec.size}")

    def write(self, offset: int, data: memoryview | bytes) -> None:
        """Write a data extent at ``offset`` (must be the current end of what arrived)."""
        self._check_range(offset, len(data))
        self._start_verifier()
        view = memoryview(data)
        pos = 0
        try:
            while pos < len(view):
                pos += os.pwrite(self._fd, view[pos:], offset + pos)
        except OSError as exc:
            raise TransferError(f"stream {self.name!r}: write failed at {offset + pos}: {exc.strerror}") from exc
        self.frontier += len(view)

    def hole(self, offset: int, length: int) -> None:
        """Record a hole extent: nothing is written, the region past the frontier is a hole."""
        self._check_range(offset, length)
        self._start_verifier()
        self.frontier += length

    def sync(self, upto: int | None = None) -> int:
        """Make what was written durable and acknowledge it up to ``upto`` (default: all).

        May run in a syncer thread while the writer goes on writing; returns the acked offset.
        """
        self._start_verifier()
        with self._lock:
            target = self.frontier if upto is None else min(upto, self.frontier)
            if self.spec.growing:  # its end is not known yet: acknowledge whole blocks only
                target -= target % BLOCK
            if self.done or self._fd < 0 or target <= self.acked:
                return self.acked
            if target % BLOCK and target != self.spec.size:
                raise TransferError(f"stream {self.name!r}: checkpoint at unaligned offset {target}")
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise TransferError(f"stream {self.name!r}: fdatasync failed: {exc.strerror}") from exc
            self.acked = target
            self._targets.put(target)  # under the lock, so the verifier sees increasing targets
            return target

    def end(self, size: int, digest: str) -> None:
        """Check the stream is complete and that what was written hashes to ``digest``.

        A growing stream learns its size here (at most its bound; the part file is cut to it).
        """
        if size != self.spec.size and not (self.spec.growing and size <= self.spec.size):
            raise TransferError(f"stream {self.name!r}: END announces size {size}, expected {self.spec.size}")
        if self.frontier != size:
            raise TruncatedStreamError(f"stream {self.name!r}: END at {self.frontier} of {size} bytes")
        if self.spec.growing:
            with self._lock:
                try:
                    os.ftruncate(self._fd, size)
                except OSError as exc:
                    raise TransferError(f"stream {self.name!r}: cannot cut to {size} bytes: {exc.strerror}") from exc
                self.spec = replace(self.spec, size=size, growing=False)
        self._start_verifier()
        self.sync()
        with self._lock:
            self._targets.put(self.spec.size)
            self._targets.put(None)
        assert self._verifier is not None
        self._verifier.join()
        if self._hash_error is not None:
            raise TransferError(f"stream {self.name!r}: reading back the written data failed: "
                                f"{self._hash_error}") from self._hash_error
        written = self._hash.hexdigest()
        if written != digest:
            raise IntegrityError(f"stream {self.name!r}: SHA-256 of the written data ({written[:16]}...) "
                                 f"does not match the source's ({digest[:16]}...)")
        with self._lock:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise TransferError(f"stream {self.name!r}: fsync failed: {exc.strerror}") from exc
            self.digest = written
            self.done = True
        self.close()

    def close(self) -> None:
        """Stop the verifier and close the file (idempotent)."""
        if self._verifier is not None and self._verifier.is_alive():
            self._stopping.set()
            self._targets.put(None)
            self._verifier.join()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class Staging:
    """A staging directory for one migration's incoming streams."""

    def __init__(self, directory: str, sinks: dict[int, StreamSink], installed: bool) -> None:
        self._state_lock = threading.RLock()
        self.directory = directory
        self.sinks = sinks
        self.installed = installed

    @classmethod
    def open(cls, directory: str | os.PathLike[str], specs: Iterable[StreamSpec] = ()) -> Staging:
        """Create the staging directory, or reopen it to resume, then ``add`` each spec."""
        directory = os.fspath(directory)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        state = cls._load_state(directory)
        installed = bool(state and state.get("installed"))
        staging = cls(directory, {}, installed)
        try:
            for key, old in (state or {}).get("streams", {}).items():
                try:
                    spec = StreamSpec(int(key), old["name"], old["kind"], old["size"], old["target"],
                                      old.get("growing", False))
                    acked, done = int(old["acked"]), bool(old.get("done"))
                    if not 0 <= acked <= spec.size:
                        raise ValueError(f"acked offset {acked} outside the stream")
                except (KeyError, TypeError, ValueError, TransferError) as exc:
                    raise ResumeError(f"staging state in {directory!r} is inconsistent: {exc}") from exc
                part = part_path(directory, spec)
                if not installed and (acked or done) and not os.path.exists(part):
                    log.warning("stream %s: staged part file is gone; restarting it from 0", spec.name)
                    acked, done = 0, False
                staging.sinks[spec.channel] = StreamSink(spec, part, acked, done, old.get("digest"))
            for spec in specs:
                staging.add(spec, save=False)
        except BaseException:
            for sink in staging.sinks.values():
                sink.close()
            raise
        staging.save_state()
        return staging

    def add(self, spec: StreamSpec, *, save: bool = True) -> StreamSink:
        """Stage a stream, or find the staged one when resuming (it must be identical)."""
        with self._state_lock:  # the syncer thread may be writing state.json from self.sinks
            return self._add(spec, save)

    def _add(self, spec: StreamSpec, save: bool) -> StreamSink:
        old = self.sinks.get(spec.channel)
        if old is not None:
            if old.spec != spec:
                raise ResumeError(f"stream {spec.name!r} on channel {spec.channel} differs from the "
                                  f"staged {old.spec.name!r}; cannot resume")
            return old
        for other in self.sinks.values():
            if other.spec.name == spec.name or (spec.target and other.spec.target == spec.target):
                raise TransferError(f"stream {spec.name!r} clashes with staged stream {other.spec.name!r}")
        if spec.target and os.path.lexists(spec.target):
            # discard() removes targets: never adopt a file that was there before.
            raise TransferError(f"stream {spec.name!r}: target {spec.target!r} already exists")
        part = part_path(self.directory, spec)
        sink = self.sinks[spec.channel] = StreamSink(spec, part, 0, False, None)
        if save:
            self.save_state()
        return sink

    @staticmethod
    def _load_state(directory: str) -> dict | None:
        path = os.path.join(directory, STATE_FILE)
        try:
            with open(path, encoding="utf-8") as fh:
                state = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ResumeError(f"staging state {path!r} is unreadable: {exc}") from exc
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ResumeError(f"staging state {path!r} has an unknown format")
        return state

    def save_state(self) -> None:
        """Write state.json atomically (temp file, fsync, rename, fsync directory)."""
        with self._state_lock:
            self._write_state()

    def _write_state(self) -> None:
        state = {
            "version": STATE_VERSION,
            "installed": self.installed,
            "streams": {
                str(ch): {"name": s.spec.name, "kind": s.spec.kind, "size": s.spec.size,
                          "target": s.spec.target, "growing": s.spec.growing,
                          "acked": s.acked, "done": s.done, "digest": s.digest}
                for ch, s in self.sinks.items()
            },
        }
        atomic_write(os.path.join(self.directory, STATE_FILE),
                     json.dumps(state, sort_keys=True).encode(), mode=0o600)

    def sink(self, channel: int) -> StreamSink:
        try:
            return self.sinks[channel]
        except KeyError:
            raise TransferError(f"no stream on channel {channel}") from None

    def by_name(self, name: str) -> StreamSink | None:
        for s in self.sinks.values():
            if s.spec.name == name:
                return s
        return None

    def resume_offsets(self) -> dict[str, int]:
        """Per stream name, the offset the sender must (re)start from."""
        return {s.spec.name: (s.spec.size if s.done else s.acked) for s in self.sinks.values()}

    def checkpoint(self) -> dict[str, int]:
        """fdatasync every stream with new data, persist the offsets; returns resume offsets."""
        for s in self.sinks.values():
            s.sync()
        self.save_state()
        return self.resume_offsets()

    def part_path(self, channel: int) -> str:
        return self.sink(channel).path

    def read_bytes(self, channel: int) -> bytes:
        """The content of a small verified stream (domain XML, manifest)."""
        s = self.sink(channel)
        if not s.done:
            raise TransferError(f"stream {s.name!r} is not complete")
        with open(s.spec.target if self.installed and s.spec.target else s.path, "rb") as fh:
            return fh.read()

    def commit(self) -> None:
        """Rename every verified stream with a target into place (atomic per file)."""
        pending = [s for s in self.sinks.values() if not s.done]
        if pending:
            raise TransferError(f"cannot commit: stream {pending[0].name!r} is incomplete")
        dirs = set()
        for s in self.sinks.values():
            if not s.spec.target or (self.installed and not os.path.exists(s.path)):
                continue
            try:
                os.replace(s.path, s.spec.target)
            except OSError as exc:
                raise TransferError(f"stream {s.name!r}: cannot move into {s.spec.target!r}: "
                                    f"{exc.strerror}") from exc
            dirs.add(os.path.dirname(os.path.abspath(s.spec.target)))
            self.installed = True
            self.save_state()
        for d in dirs:
            fsync_dir(d)
        self.installed = True
        self.save_state()

    def discard(self) -> None:
        """Remove every partial file, every file installed by commit(), and the directory."""
        for s in self.sinks.values():
            s.close()
            doomed = [s.path] + ([s.spec.target] if self.installed and s.spec.target else [])
            for path in doomed:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if os.path.exists(self.directory):
            shutil.rmtree(self.directory)

    def close(self) -> None:
        """After the VM runs at the destination: drop the staging directory, keep targets."""
        for s in self.sinks.values():
            s.close()
            if s.spec.target:
                try:
                    os.unlink(s.path)  # only there if commit() never ran
                except FileNotFoundError:
                    pass
        shutil.rmtree(self.directory)

"""What moves: the VM's streams as both daemons name them, on top of ``migsec.transfer``.

Streams (names agreed through the signed request's migration plan, never chosen
by B from what A sends): ``domain.xml`` (kind xml), ``disk<i>`` for the i-th file of
``plan.files`` (kind disk; B picks the target path from its own storage mapping),
``memory`` (the libvirt save image, kind memory; it stays in staging
and B restores from it). The manifest follows as the plane's last stream.

The memory image is streamed while libvirt is still saving it (a growing stream,
``migsec.transfer.GrowingFileSource``): the save is most of the downtime, and the
image no longer waits for it to end. See ``source_streams``.
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterator

from migsec import virt
from migsec.errors import MappingError, MigsecError, TransferError
from migsec.transfer.plane import Expected, TokenBucket, receive_streams, send_streams
from migsec.transfer.sink import Staging
from migsec.transfer.source import GrowingFileSource, StreamSource

if TYPE_CHECKING:
    from migsec.migration.link import SourceSession
    from migsec.daemon.services import Services
    from migsec.protocol.messages import MigrationRequest
    from migsec.virt.describe import DomainInfo

log = logging.getLogger("migsecd.dataplane")
MIB = 1024 * 1024
XML_MAX = 1 * MIB
PLANE_TIMEOUT_S = 120


# ---- the shared naming ---------------------------------------------------------------------
def request_files(request: MigrationRequest) -> list[str]:
    """The files to move, in stream order (``disk<i>``): the signed plan's (MalformedMessageError
    for a request without one)."""
    return list(request.require_plan().files)


# ---- A ------------------------------------------------------------------------------------------
def memory_image_bound(memory_bytes: int) -> int:
    """The largest save image B accepts for a guest of ``memory_bytes`` (A streams within it)."""
    return int(memory_bytes) * 2 + 256 * MIB


# libvirt writes its save image front to back under this magic and rewrites the magic at
# offset 0 as its last write, once QEMU's stream is complete (libvirt's qemu_saveimage.c);
# stopping QEMU takes another 1-2 s before virDomainSaveFlags returns (bench/probe_save_image.py).
SAVE_MAGIC_PARTIAL = b"LibvirtQemudPart"
SAVE_MAGIC = b"LibvirtQemudSave"


def source_streams(info: DomainInfo, files: list[str], saver: Any, memory_path: Path) -> Iterator[Any]:
    """The streams in sending order: the XML, the disks, then the memory image while it is saved.

    The disks' digests start at once, so hashing overlaps the memory save. The memory
    image is followed as libvirt writes it (``GrowingFileSource``): its body leaves while
    the save runs, and its END (digest of the final file, magic included) only once
    libvirt wrote the final magic (its last write to the file), so B can never restore a
    partial image; B may restore (paused) while libvirt at A still stops QEMU, and A
    waits for the save to succeed before its commit decision. ``saver`` has
    ``finished()`` and ``error()``; a save that fails earlier fails the stream.
    """
    disks = [StreamSource(2 + i, f"disk{i}", "disk", path=path) for i, path in enumerate(files)]
    for src in disks:
        src.start_digest()
    memory = GrowingFileSource(2 + len(files), "memory", "memory", memory_path, writer=saver,
                               max_size=memory_image_bound(info.memory_bytes),
                               head=(SAVE_MAGIC_PARTIAL, SAVE_MAGIC), complete_on_final_head=True)
    memory.start_digest()  # hashes as the save writes, instead of after it
    yield StreamSource(1, "domain.xml", "xml", data=info.xml.encode())
    yield from disks
    yield memory


def send(session: SourceSession, streams: Iterator[Any], *, bandwidth: int | None,
         progress: Callable[[str, int, int], None], timeout: float = PLANE_TIMEOUT_S) -> Any:
    """Run the plane on A's session; returns the SendResult. ``timeout``: longest silence of B."""
    def report(p: Any) -> None:
        # past the known total a growing stream (the save image) is being sent: its size is
        # not known until libvirt finished writing it, so the total is 0 = unknown, not 100 %
        progress(p.stream, p.all_done, p.all_total if p.all_total >= p.all_done else 0)

    result = send_streams(session.sock, session.records, streams,
                          bandwidth_limit=(bandwidth / MIB) if bandwidth else None,
                          progress=report, timeout=max(1.0, min(timeout, PLANE_TIMEOUT_S)))
    session.bytes_on_wire += result.wire_bytes
    return result


# ---- B ------------------------------------------------------------------------------------------
def disk_map(services: Services, files: list[str]) -> dict[str, str]:
    """Source file -> destination path, from B's [storage] settings (map, else image_dir)."""
    storage = services.config.storage
    out: dict[str, str] = {}
    for f in files:
        p = PurePosixPath(f)
        if not p.is_absolute() or ".." in p.parts:
            raise MappingError(f"disk path {f!r} from the source is not a clean absolute path")
        target = None
        for src_dir, dst_dir in sorted(storage.map.items(), key=lambda kv: -len(kv[0])):
            try:
                rel = p.relative_to(src_dir)
            except ValueError:
                continue
            target = str(PurePosixPath(dst_dir) / rel)
            break
        if target is None:
            target = str(PurePosixPath(storage.image_dir) / p.name)
        out[f] = target
    if len(set(out.values())) != len(out):
        raise MappingError("two source disks map to the same destination path")
    return out


def expected_streams(services: Services, request: MigrationRequest) -> dict[str, Any]:
    plan = request.require_plan()
    files = list(plan.files)
    targets = disk_map(services, files)
    expected = {"domain.xml": Expected("xml", max_size=XML_MAX),
                "memory": Expected("memory", max_size=memory_image_bound(plan.memory_bytes))}
    for i, f in enumerate(files):
        Path(targets[f]).parent.mkdir(parents=True, exist_ok=True)
        expected[f"disk{i}"] = Expected("disk", target=targets[f])
    return expected


@dataclass
class Received:
    memory_path: str
    restore_xml: str
    manifest: Any
    manifest_json: bytes
    wire_bytes: int


def staging_dir(services: Services, migration_id: str) -> Path:
    return Path(services.config.paths.staging_dir) / f"in-{migration_id}"


class _ThrottledSocket:
    """A socket whose reads are paced by a token bucket: B enforces its own policy's bandwidth
    obligation by reading no faster (TCP flow control then slows A)."""

    def __init__(self, sock: socket.socket, rate: float) -> None:
        self._sock = sock
        self._bucket = TokenBucket(rate)

    def recv_into(self, buffer: Any, nbytes: int = 0, *args: Any) -> int:
        n = self._sock.recv_into(buffer, nbytes, *args)
        if n:
            self._bucket.take(n)
        return n

    def recv(self, bufsize: int, *args: Any) -> bytes:
        data = self._sock.recv(bufsize, *args)
        if data:
            self._bucket.take(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def receive(services: Services, sock: socket.socket, records: Any, request: MigrationRequest, migration_id: str,
            *, bandwidth: int | None = None) -> Received:
    """Receive into staging, install the disks, and prepare the restore XML (B's mappings).

    ``bandwidth`` (bytes/s): the limit B's own policy set (an obligation), applied to reading.
    """
    expected = expected_streams(services, request)
    wire: Any = _ThrottledSocket(sock, bandwidth) if bandwidth else sock
    result = receive_streams(wire, records, str(staging_dir(services, migration_id)), expected,
                             timeout=PLANE_TIMEOUT_S)
    staging = result.staging
    staging.commit()
    memory = staging.by_name("memory")
    if memory is None:
        raise TransferError("no memory image arrived")
    plan = request.require_plan()
    network = services.config.network
    with virt.connect(services.config.libvirt.uri) as conn:
        xml = virt.save_image_restore_xml(
            conn, memory.path, uuid=plan.vm_uuid, disk_map=disk_map(services, list(plan.files)),
            network_map=dict(network.map) or None, bridge_map=dict(network.bridge_map) or None)
    return Received(memory.path, xml, result.manifest, result.manifest_json, result.wire_bytes)


def discard(services: Services, migration_id: str) -> None:
    """Remove every partial and installed file of an incoming migration (before its commit)."""
    directory = staging_dir(services, migration_id)
    if directory.exists():
        try:
            Staging.open(directory).discard()
        except MigsecError as exc:
            log.warning("discarding %s: %s; removing the directory", directory, exc)
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
            # disks are staged beside their targets: find this migration's part files there
            storage = services.config.storage
            for d in {Path(storage.image_dir), *(Path(t) for t in storage.map.values())}:
                for part in d.glob(f".migsec-{directory.name}.ch*.part") if d.is_dir() else ():
                    part.unlink(missing_ok=True)

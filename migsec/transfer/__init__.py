"""migsec.transfer: VM state as streams over the record layer, and the commit exchange.

For the daemon: run ``send_streams`` / ``receive_streams`` in a thread on a blocking socket
after the inter-domain handshake produced ``SessionKeys`` (FACTS.md: ~2x faster than asyncio
streams for bulk data).

Sources (A) -- ``source.py``, ``extents.py``
    ``StreamSource(channel, name, kind, *, path=None | data=None, target="")``; kind is one of
    ``KINDS = ("xml", "disk", "memory", "manifest")``; channels 1..65534 (0 is control,
    ``MANIFEST_CHANNEL`` = 65535). ``.spec -> StreamSpec(channel, name, kind, size, target)``,
    ``.pieces(start)`` yields ("data", off, len, view) / ("hole", off, len, None) from a resume
    offset, ``.digest() -> (hex, allocated_bytes)`` (hashed in a background thread).
    ``iter_extents(path) -> Extent(kind, offset, length)``: SEEK_DATA/SEEK_HOLE plus all-zero
    64 KiB blocks (``BLOCK``).
    ``GrowingFileSource(channel, name, kind, path, *, writer, max_size, head=None)``: a file
    another process still writes front to back (libvirt's save image; ``writer.finished()``,
    ``writer.error()``). Its spec is ``growing`` with ``size`` = ``max_size`` until the writer
    finished; ``pieces`` yields whole BLOCKs as they appear, ("wait", pos, 0, None) while the
    writer is behind (the plane sends keepalives), and the tail at the end. ``head=(while_writing,
    final)`` is the one rewrite a writer may do at the end (libvirt: ``LibvirtQemudPart`` ->
    ``LibvirtQemudSave`` at offset 0): block 0 is sent and hashed with ``final`` in place, and
    once the writer finished the file's first block must equal what was sent, so the END digest
    is that of the final file. A failed writer raises TransferError: the stream is never ENDed,
    so B holds only a partial, unverified part file that it discards on abort.

Stream digest ("migsec-stream-digest-v1", ``extents.py``)
    SHA-256 over the canonical block sequence: ``Z||count`` per run of all-zero 64 KiB blocks,
    ``D||bytes`` per data block, ``E||size`` at the end. Independent of chunking and of how
    the file system stores zeros, and holes cost nothing to hash; each side computes it by
    reading the file (B reads back what it wrote). ``file_digest(path)``, ``bytes_digest(b)``.
    It is the 32-byte value in END records, the manifest and the signed Receipt.

Sinks (B) -- ``sink.py``
    ``Staging.open(directory, specs=())`` creates or reopens (resume) a 0700 staging dir with
    ``ch<N>.part`` files (pre-sized, holes never written; a stream with a target is staged
    beside it as ``.migsec-<dir name>.ch<N>.part``, so commit never renames across file
    systems) and ``state.json`` (acked offsets,
    written atomically). ``.add(spec)``, ``.sink(channel)``, ``.by_name(name)`` ->
    ``StreamSink`` (``.path``, ``.write(off, data)``, ``.hole(off, len)``, ``.sync()``,
    ``.end(size, digest_hex)`` -> IntegrityError naming the stream), ``.resume_offsets()``,
    ``.checkpoint()``, ``.read_bytes(channel)``, ``.commit()`` (renames every stream with a
    target into place; streams without a target, e.g. the memory image, stay at ``.path``),
    ``.discard()`` (removes part files, installed targets and the directory; a target that
    existed before is refused at ``add``), ``.close()`` (after the VM runs: drop staging only).

Data plane -- ``plane.py``
    ``send_streams(sock, records, sources, *, bandwidth_limit=None (MiB/s), progress=None,
    timeout=60) -> SendResult(manifest, manifest_json, wire_bytes, logical_bytes, data_bytes)``.
    ``sources`` is iterated lazily; a growing source is sent while its file grows. Resume
    offsets come from B's staging in the first record B sends, so a resumed session just
    calls send_streams again with the same sources on the new session.
    ``receive_streams(sock, records, staging_dir, expected: {name: Expected(kind, target="",
    size=None, max_size=None)}, *, ack_interval=16 MiB, timeout=60) -> ReceiveResult(manifest,
    manifest_json, staging, wire_bytes, resumed_from)``. Returns once every stream was written,
    fsynced and verified and the manifest matched. On failure B makes what it wrote durable
    (resume point), tells A why (A raises IntegrityError / ResumeError / TransferError with
    B's reason), and raises; ``PeerConnectionError`` (a TransferError) means the link broke
    and a resume can follow. ``progress(Progress(stream, done, total, all_done, all_total,
    wire_bytes))`` is called at most every 0.1 s and at the end of every stream. While the
    next source is not ready, a growing file's writer is behind or a digest is catching up, A sends
    keepalives, so ``timeout`` only has to cover real silence. Neither side runs more than
    256 MiB ahead of its SHA-256 thread (no long stall at END where SHA-256 is slow).
    ``Manifest`` / ``ManifestEntry(channel, name, kind, size, allocated, digest, target)``:
    ``.to_json()`` is the canonical form to sign, ``Manifest.from_json`` the strict decoder.
    The record layer is not closed: the commit messages can follow on channel 0. Records B
    sent after its last ACK (e.g. the Receipt) stay buffered in A's record layer: drain
    ``records.next_event()`` before reading the socket again.

Commit exchange -- ``commit.py`` (DESIGN §3.4)
    ``SourceCommit(migration_id, src_did, dest_did, key, peer_key, journal, resume_vm,
    release_vm, transcript_hash=None)`` (``peer_key`` and ``transcript_hash`` may be None until
    ``handshaken(peer_key, transcript_hash=)``; ``streaming(transcript_hash=)`` gives a resumed
    session's; no receipt is accepted without both, nor one naming another session): progress
    ``authorized/handshaken/suspended/streaming(**fields)``, ``streams_sent(manifest,
    manifest_json)``, ``saved(**fields)``, ``receipt_received(token) -> decision token``
    (journals "committed" before returning it), ``release()`` (recovery),
    ``resumed_received(token)``, ``fail(reason) -> abort Decision`` (resumes A; the same
    Decision on every later call) or, after the commit, the commit Decision to resend (A never
    resumes then). ``DestinationCommit(..., transcript_hash, restore_paused, resume_vm, discard,
    cleanup=None)``: ``accepted/receiving(**fields)``, ``streams_verified(manifest,
    manifest_json)``, ``restore() -> Receipt token``, ``decision_received(token) -> Resumed
    token | None`` (again: the same answer), ``resume()`` (recovery), ``finish()``,
    ``fail(reason)`` (DISCARDED before the receipt, IN_DOUBT after it: never resumes without
    A's signed commit). ``X.from_journal(entry, ...)`` rebuilds either from a journal entry.
    ``journal(phase, **fields)`` uses the phase names of ``migsec.migration.journal``.
    ``as_control(kind, token)`` is the channel-0 CONTROL body.
"""
from migsec.transfer.commit import DestinationCommit, SourceCommit, as_control
from migsec.transfer.extents import BLOCK, Extent, StreamDigest, bytes_digest, file_digest, iter_extents
from migsec.transfer.manifest import Manifest, ManifestEntry
from migsec.transfer.plane import (
    ACK_INTERVAL,
    MANIFEST_CHANNEL,
    Expected,
    PeerConnectionError,
    Progress,
    ReceiveResult,
    SendResult,
    SourceDecision,
    TokenBucket,
    receive_streams,
    send_streams,
)
from migsec.transfer.sink import Staging, StreamSink
from migsec.transfer.source import KINDS, GrowingFileSource, StreamSource, StreamSpec

__all__ = [
    "ACK_INTERVAL", "BLOCK", "KINDS", "MANIFEST_CHANNEL",
    "DestinationCommit", "Expected", "Extent", "GrowingFileSource", "Manifest", "ManifestEntry", "PeerConnectionError",
    "Progress", "ReceiveResult", "SendResult", "SourceCommit", "SourceDecision", "Staging", "StreamDigest",
    "StreamSink", "StreamSource", "StreamSpec", "TokenBucket",
    "as_control", "bytes_digest", "file_digest", "iter_extents", "receive_streams", "send_streams",
]

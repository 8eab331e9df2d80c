"""The manifest: every stream of a migration with its size, digest and allocation.

Its canonical JSON form (sorted keys, no spaces, integers only) is what the source
domain signs and the destination's receipt covers, so both sides can later prove
which bytes moved.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from migsec.errors import MalformedMessageError, MigsecError
from migsec.protocol.codec import canonical_json, parse_json_object
from migsec.transfer.extents import BLOCK, DIGEST_NAME
from migsec.transfer.source import StreamSpec

MANIFEST_VERSION = 1
MAX_STREAMS = 4096


@dataclass(frozen=True)
class ManifestEntry:
    channel: int
    name: str
    kind: str
    size: int
    allocated: int
    digest: str
    target: str = ""

    def __post_init__(self) -> None:
        StreamSpec(self.channel, self.name, self.kind, self.size, self.target)  # validates
        if not isinstance(self.allocated, int) or not 0 <= self.allocated <= self.size:
            raise MalformedMessageError(f"manifest: stream {self.name!r} allocated {self.allocated!r} "
                                        f"is not within its size {self.size}")
        if not isinstance(self.digest, str) or len(self.digest) != 64 or \
                self.digest.strip("0123456789abcdef"):
            raise MalformedMessageError(f"manifest: stream {self.name!r} digest is not 64 hex digits")


@dataclass(frozen=True)
class Manifest:
    migration_id: str
    streams: tuple[ManifestEntry, ...]

    def to_json(self) -> bytes:
        """The canonical bytes (what is signed)."""
        return canonical_json({
            "version": MANIFEST_VERSION,
            "migration_id": self.migration_id,
            "digest": DIGEST_NAME,
            "block": BLOCK,
            "streams": [asdict(e) for e in self.streams],
        })

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Strict decoder: unknown versions, fields or duplicate streams are refused."""
        obj = parse_json_object(data, "manifest")
        if set(obj) != {"version", "migration_id", "digest", "block", "streams"}:
            raise MalformedMessageError(f"manifest has fields {sorted(obj)}")
        if obj["version"] != MANIFEST_VERSION or obj["digest"] != DIGEST_NAME or obj["block"] != BLOCK:
            raise MalformedMessageError(
                f"manifest version/digest/block {obj['version']!r}/{obj['digest']!r}/{obj['block']!r} unsupported")
        streams = obj["streams"]
        if not isinstance(streams, list) or len(streams) > MAX_STREAMS:
            raise MalformedMessageError("manifest streams must be a list of at most "
                                        f"{MAX_STREAMS} entries")
        fields = set(ManifestEntry.__dataclass_fields__)
        entries = []
        for item in streams:
            if not isinstance(item, dict) or set(item) != fields:
                raise MalformedMessageError(f"manifest entry has fields {sorted(item) if isinstance(item, dict) else item!r}")
            try:
                entries.append(ManifestEntry(**item))
            except MigsecError as exc:
                raise MalformedMessageError(f"manifest entry invalid: {exc}") from exc
        names = [e.name for e in entries]
        channels = [e.channel for e in entries]
        if len(set(names)) != len(names) or len(set(channels)) != len(channels):
            raise MalformedMessageError("manifest lists a stream name or channel twice")
        if not isinstance(obj["migration_id"], str):
            raise MalformedMessageError("manifest migration_id must be a string")
        return cls(obj["migration_id"], tuple(entries))

    def entry(self, name: str) -> ManifestEntry | None:
        for e in self.streams:
            if e.name == name:
                return e
        return None


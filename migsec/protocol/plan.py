"""The migration plan: what A's AZ vouches for about one migration, as typed data.

A ``MigrationPlan`` is the one carrier of the VM's facts between the domains (Mig_Rqst version
2; version 1 joined them into string options with ``|`` and ``,``, which a ``|`` in a disk path
broke): the VM's facts, every disk with its size, format and paths, the mode and the mappings
asked for. A's AZ builds it, B's PDP, capacity check and both data paths read it. It is immutable, validates itself on construction (as h11's events do) and
has a strict ``to_dict()`` / ``from_dict()`` pair for the signed request: ``from_dict`` rejects
unknown or missing fields, wrong types and out-of-range values with MalformedMessageError, and
``from_dict(p.to_dict()) == p`` for every valid plan. Any string a path may hold (``|``, ``,``,
spaces, non-ASCII) round-trips unchanged.

Sans-IO: nothing here reads libvirt; A's AZ builds a plan from ``virt.DomainInfo``
(``migsec.auth.servers.plan_for``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from migsec.errors import MalformedMessageError
from migsec.protocol.codec import MAX_STRING, Fields, check_ident

PLAN_VERSION = 1
MODES = ("cold", "live")
LOCAL_TYPES = ("file", "block")  # a source is then a host path
MAX_DISKS = 64
MAX_BACKING = 64
MAX_TAGS = 64
MAX_MAP = 256
MAX_BYTES = 2**63 - 1
MAX_VCPUS = 4096
# names as libvirt spells them; lenient, so that no guest libvirt describes is refused here
_TARGET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # <target dev>: vda, sdb, hdc, ...
_TYPE = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # <disk type>: file, block, network, volume, ...
_FORMAT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")  # <driver type>: raw, qcow2, vmdk, ...
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _fail(what: str) -> None:
    raise MalformedMessageError(f"migration plan: {what}")


def _check_path(value: Any, what: str) -> str:
    """A host path: 1..MAX_STRING characters, no NUL (any other character is fine)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_STRING or "\x00" in value:
        _fail(f"{what} must be a path of 1-{MAX_STRING} characters without NUL")
    return value


def _check_int(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        _fail(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def _check_text(value: Any, what: str, max_len: int = 255) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= max_len or "\x00" in value:
        _fail(f"{what} must be a non-empty string of at most {max_len} characters without NUL")
    return value


def _check_map(value: Any, what: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping) or len(value) > MAX_MAP or not all(
            isinstance(k, str) and isinstance(v, str) and k and v and len(k) <= MAX_STRING
            and len(v) <= MAX_STRING for k, v in value.items()):
        _fail(f"{what} must map at most {MAX_MAP} non-empty strings to non-empty strings")
    return MappingProxyType(dict(value))


def _list(f: Fields, key: str, max_items: int) -> list[Any]:
    value = f.raw(key)
    if not isinstance(value, list) or len(value) > max_items:
        _fail(f"field {key!r} must be a list of at most {max_items} items")
    return value


@dataclass(frozen=True)
class DiskPlan:
    """One ``<disk>`` of the VM as A declares it.

    ``source`` is the top image (type file: a path at A; None for an empty drive or a disk
    not backed by a local path), ``backing`` its backing files nearest first (type file only),
    ``virtual_size`` the guest-visible size in bytes (0 when A could not read it).
    """

    target: str
    type: str
    source: str | None
    format: str | None
    virtual_size: int = 0
    backing: tuple[str, ...] = ()
    readonly: bool = False
    shareable: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not _TARGET.fullmatch(self.target):
            _fail(f"disk target {self.target!r} is not a device name such as 'vda'")
        what = f"disk {self.target}"
        if not isinstance(self.type, str) or not _TYPE.fullmatch(self.type):
            _fail(f"{what}: type {self.type!r} is not a disk type such as 'file'")
        if self.source is not None:
            if self.type in LOCAL_TYPES:
                _check_path(self.source, f"{what}: source")
            else:
                _check_text(self.source, f"{what}: source", MAX_STRING)
        if self.format is not None and (not isinstance(self.format, str) or not _FORMAT.fullmatch(self.format)):
            _fail(f"{what}: format {self.format!r} is not an image format name such as 'qcow2'")
        _check_int(self.virtual_size, f"{what}: virtual_size", 0, MAX_BYTES)
        if not isinstance(self.backing, tuple) or len(self.backing) > MAX_BACKING:
            _fail(f"{what}: backing must be a tuple of at most {MAX_BACKING} paths")
        if self.backing and (self.type != "file" or self.source is None):
            _fail(f"{what}: only a file disk with a source has backing files")
        for path in self.backing:
            _check_path(path, f"{what}: backing file")
        for name in ("readonly", "shareable"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"{what}: {name} must be true or false")

    @property
    def files(self) -> tuple[str, ...]:
        """The local files this disk needs moved: its top image, then its backing files."""
        if self.type != "file" or self.source is None:
            return ()
        return (self.source, *self.backing)

    @property
    def mirrored(self) -> bool:
        """A live move mirrors this disk (a writable, unshared local file)."""
        return self.type == "file" and self.source is not None and not self.readonly and not self.shareable

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "type": self.type, "source": self.source, "format": self.format,
                "virtual_size": self.virtual_size, "backing": list(self.backing),
                "readonly": self.readonly, "shareable": self.shareable}

    @classmethod
    def from_dict(cls, obj: Any) -> "DiskPlan":
        f = Fields(obj, "migration plan disk")
        source, fmt = f.raw("source"), f.raw("format")
        if source is not None and not isinstance(source, str):
            _fail("disk source must be a string or null")
        if fmt is not None and not isinstance(fmt, str):
            _fail("disk format must be a string or null")
        disk = cls(target=f.string("target", max_len=64), type=f.string("type", max_len=32),
                   source=source, format=fmt, virtual_size=f.integer("virtual_size", 0, MAX_BYTES),
                   backing=tuple(_list(f, "backing", MAX_BACKING)),
                   readonly=f.boolean("readonly"), shareable=f.boolean("shareable"))
        f.done()
        return disk


@dataclass(frozen=True)
class MigrationPlan:
    """One migration as A's AZ authorizes it: the VM, its disks, the mode, the mappings asked for."""

    vm_name: str
    vm_uuid: str
    mode: str
    vcpus: int
    memory_bytes: int
    disks: tuple[DiskPlan, ...] = ()
    tags: tuple[str, ...] = ()
    paused: bool = False  # a guest paused at A stays paused at B
    storage_map: Mapping[str, str] = field(default_factory=dict)
    network_map: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_ident(self.vm_name, "migration plan: vm_name")
        if not isinstance(self.vm_uuid, str) or not _UUID.fullmatch(self.vm_uuid):
            _fail(f"vm_uuid {self.vm_uuid!r} is not a UUID")
        if self.mode not in MODES:
            _fail(f"mode must be one of {MODES}, got {self.mode!r}")
        _check_int(self.vcpus, "vcpus", 1, MAX_VCPUS)
        _check_int(self.memory_bytes, "memory_bytes", 1, MAX_BYTES)
        if not isinstance(self.disks, tuple) or len(self.disks) > MAX_DISKS or \
                not all(isinstance(d, DiskPlan) for d in self.disks):
            _fail(f"disks must be a tuple of at most {MAX_DISKS} DiskPlan")
        targets = [d.target for d in self.disks]
        if len(set(targets)) != len(targets):
            _fail(f"two disks share a target ({sorted(t for t in targets if targets.count(t) > 1)[0]})")
        if not isinstance(self.tags, tuple) or len(self.tags) > MAX_TAGS:
            _fail(f"tags must be a tuple of at most {MAX_TAGS} strings")
        for tag in self.tags:
            _check_text(tag, "a tag", MAX_STRING)
        if not isinstance(self.paused, bool):
            _fail("paused must be true or false")
        object.__setattr__(self, "storage_map", _check_map(self.storage_map, "storage_map"))
        object.__setattr__(self, "network_map", _check_map(self.network_map, "network_map"))
        if sum(d.virtual_size for d in self.disks) > MAX_BYTES:
            _fail("the disks' sizes add up to more than 2**63 - 1 bytes")

    # ---- what the consumers read ---------------------------------------------------------
    @property
    def files(self) -> tuple[str, ...]:
        """Every local file to move (each disk's top image, then its backing files), once each:
        the one definition of what a migration moves (``disk<i>`` is the i-th)."""
        seen: dict[str, None] = {}
        for disk in self.disks:
            for f in disk.files:
                seen.setdefault(f, None)
        return tuple(seen)

    @property
    def top_files(self) -> tuple[str, ...]:
        """The top images: the source copy may remove these after the move, never a backing file."""
        return tuple(d.source for d in self.disks if d.type == "file" and d.source is not None)

    @property
    def disk_bytes(self) -> int:
        return sum(d.virtual_size for d in self.disks)

    @property
    def mirrored_disks(self) -> tuple[DiskPlan, ...]:
        """The disks a live move mirrors (B pre-creates each)."""
        return tuple(d for d in self.disks if d.mirrored)

    # ---- the wire form ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON object (lists, strings, integers, booleans, null): what the request carries."""
        return {
            "v": PLAN_VERSION, "vm_name": self.vm_name, "vm_uuid": self.vm_uuid, "mode": self.mode,
            "vcpus": self.vcpus, "memory_bytes": self.memory_bytes,
            "disks": [d.to_dict() for d in self.disks], "tags": list(self.tags), "paused": self.paused,
            "storage_map": dict(self.storage_map), "network_map": dict(self.network_map),
        }

    @classmethod
    def from_dict(cls, obj: Any) -> "MigrationPlan":
        """The plan ``obj`` describes; MalformedMessageError naming the first problem otherwise."""
        f = Fields(obj, "migration plan")
        version = f.integer("v", 0, 255)
        if version != PLAN_VERSION:
            _fail(f"unsupported version {version}, expected {PLAN_VERSION}")
        tags = _list(f, "tags", MAX_TAGS)
        plan = cls(vm_name=f.ident("vm_name"), vm_uuid=f.string("vm_uuid", max_len=36),
                   mode=f.choice("mode", MODES), vcpus=f.integer("vcpus", 1, MAX_VCPUS),
                   memory_bytes=f.integer("memory_bytes", 1, MAX_BYTES),
                   disks=tuple(DiskPlan.from_dict(d) for d in _list(f, "disks", MAX_DISKS)),
                   tags=tuple(tags), paused=f.boolean("paused"),
                   storage_map=f.string_map("storage_map", max_items=MAX_MAP),
                   network_map=f.string_map("network_map", max_items=MAX_MAP))
        f.done()
        return plan

"""Describing a domain for migration, and refusing what cold migration cannot move."""
from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass

import libvirt

from migsec.errors import MappingError, UnsupportedDeviceError
from migsec.virt.connection import Connection, lookup
from migsec.virt.domxml import (
    BackingFile,
    BootFiles,
    DiskInfo,
    InterfaceInfo,
    parse_domain_xml,
    view,
)
from migsec.virt.errors import DiskImageError, libvirt_call
from migsec.virt.images import image_chain
from migsec.virt.rewrite import PathMap, is_network_key


class DomainState(str, enum.Enum):
    """libvirt's domain states, by the names virsh prints."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # being shut down
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @property
    def active(self) -> bool:
        """True when a hypervisor process exists for the domain."""
        return self not in {DomainState.SHUTOFF, DomainState.NOSTATE}


_STATES = {
    getattr(libvirt, "VIR_DOMAIN_NOSTATE", 0): DomainState.NOSTATE,
    getattr(libvirt, "VIR_DOMAIN_RUNNING", 1): DomainState.RUNNING,
    getattr(libvirt, "VIR_DOMAIN_BLOCKED", 2): DomainState.BLOCKED,
    getattr(libvirt, "VIR_DOMAIN_PAUSED", 3): DomainState.PAUSED,
    getattr(libvirt, "VIR_DOMAIN_SHUTDOWN", 4): DomainState.SHUTDOWN,
    getattr(libvirt, "VIR_DOMAIN_SHUTOFF", 5): DomainState.SHUTOFF,
    getattr(libvirt, "VIR_DOMAIN_CRASHED", 6): DomainState.CRASHED,
    getattr(libvirt, "VIR_DOMAIN_PMSUSPENDED", 7): DomainState.PMSUSPENDED,
}


def state_of(dom: libvirt.virDomain, uri: str) -> DomainState:
    with libvirt_call("get domain state", uri=uri, domain=dom.name()):
        code = dom.state(0)[0]
    return _STATES.get(code, DomainState.NOSTATE)


@dataclass(frozen=True)
class DomainInfo:
    """Everything migsec needs to know about a domain before moving it."""

    name: str
    uuid: str
    state: DomainState
    persistent: bool
    domain_type: str
    vcpus: int
    max_vcpus: int
    memory_bytes: int
    current_memory_bytes: int
    disks: tuple[DiskInfo, ...]
    interfaces: tuple[InterfaceInfo, ...]
    tags: tuple[str, ...]
    boot: BootFiles
    unmovable: tuple[str, ...]
    xml: str


def _with_sizes(dom: libvirt.virDomain, disk: DiskInfo, local_files: bool, name: str) -> DiskInfo:
    label = f"domain '{name}' disk '{disk.target}'"
    chain = disk.backing_chain
    chain_source = disk.chain_source
    virtual = allocated = None
    # Only images visible from here; on another host or mount namespace libvirt is the source.
    if local_files and disk.type == "file" and disk.source and os.path.exists(disk.source):
        try:
            entries = image_chain(disk.source, format=disk.format or "raw")
        except DiskImageError as exc:
            raise DiskImageError(f"{label}: {exc}") from exc
        virtual, allocated = entries[0].virtual_size, entries[0].allocated_size
        if chain_source != "libvirt":  # the live XML is what QEMU really opened
            chain = tuple(
                BackingFile(path=e.path, format=e.format, virtual_size=e.virtual_size,
                            allocated_size=e.allocated_size)
                for e in entries[1:]
            )
            chain_source = "qemu-img"
    if virtual is None and disk.source and disk.target:
        # libvirt can size images on hosts we cannot see (remote URIs, lab namespaces).
        try:
            capacity, allocation, _physical = dom.blockInfo(disk.target, 0)
            virtual, allocated = int(capacity), int(allocation)
        except libvirt.libvirtError:
            pass  # sizes stay unknown (None); the caller sees that, nothing is assumed
    return dataclasses.replace(
        disk, backing_chain=chain, chain_source=chain_source, virtual_size=virtual, allocated_size=allocated
    )


def describe_domain(conn: Connection, name_or_uuid: str) -> DomainInfo:
    """Describe a domain: identity, state, CPUs, memory, disks with chains and sizes, NICs, tags.

    Backing chains come from libvirt's live XML, else from qemu-img when
    ``conn.local_files``; sizes from qemu-img, else libvirt's blockInfo.
    """
    dom = lookup(conn, name_or_uuid)
    with libvirt_call("describe domain", uri=conn.uri, domain=name_or_uuid):
        xml = dom.XMLDesc(0)
        persistent = bool(dom.isPersistent())
    v = view(parse_domain_xml(xml))
    disks = tuple(_with_sizes(dom, d, conn.local_files, v.name) for d in v.disks)
    return DomainInfo(
        name=v.name,
        uuid=v.uuid,
        state=state_of(dom, conn.uri),
        persistent=persistent,
        domain_type=v.domain_type,
        vcpus=v.vcpus,
        max_vcpus=v.max_vcpus,
        memory_bytes=v.memory_bytes,
        current_memory_bytes=v.current_memory_bytes,
        disks=disks,
        interfaces=v.interfaces,
        tags=v.tags,
        boot=v.boot,
        unmovable=v.unmovable,
        xml=xml,
    )


def check_migratable(info: DomainInfo, disk_map: Mapping[str, str] | None = None) -> None:
    """Refuse what cold migration cannot move, naming every offending device at once.

    Passthrough devices and shareable disks are always refused; block and
    network disks only when ``disk_map`` has no mapping for them (then the
    operator has said where they live at the destination). With ``disk_map``,
    every file disk must be mapped too (MappingError).
    """
    problems: list[str] = [f"{dev}" for dev in info.unmovable]
    unmapped: list[str] = []
    dmap = dict(disk_map or {})
    network_keys = {k for k in dmap if isinstance(k, str) and is_network_key(k)}
    paths = PathMap({k: v for k, v in dmap.items() if k not in network_keys})
    for disk in info.disks:
        label = f"disk '{disk.target}'"
        if disk.shareable:
            problems.append(f"{label} is shareable (another host may be writing it)")
            continue
        if disk.source is None:
            continue
        if disk.type == "block":
            if paths.lookup(disk.source) is None:
                problems.append(f"{label} is a block device '{disk.source}' with no mapping")
        elif disk.type == "network":
            if disk.source not in network_keys:
                problems.append(f"{label} is a network disk '{disk.source}' with no mapping")
        elif disk.type != "file":
            problems.append(f"{label} has type '{disk.type}' ({disk.source}), which cannot be moved")
        elif disk_map is not None:
            for f in disk.files:
                if paths.lookup(f) is None:
                    unmapped.append(f"{label} file '{f}'")
    if problems:
        raise UnsupportedDeviceError(
            f"domain '{info.name}' cannot be cold-migrated: " + "; ".join(problems)
        )
    if unmapped:
        raise MappingError(f"domain '{info.name}': no storage mapping for " + ", ".join(unmapped))

"""migsec.virt — the only importer of libvirt (modelled on virt-manager's virtinst).

Connections::

    conn = connect("qemu:///system")          # any URI: test:///default,
    with connect(uri) as conn: ...             #   qemu+unix:///system?socket=/path/libvirt-sock
    conn.uri, conn.hostname, conn.driver, conn.capacity() -> HostCapacity, conn.list_domains()
    warm_capabilities(uri) -> seconds   make libvirtd probe QEMU now (daemon start), not at a restore
    conn.local_files   may qemu-img read this libvirt's disk paths? (False for remote and
                       socket= URIs, whose paths may name other files; connect(local_files=))

Describing (frozen dataclasses)::

    info = describe_domain(conn, name_or_uuid) -> DomainInfo
        .name .uuid .state: DomainState .persistent .domain_type .vcpus .max_vcpus
        .memory_bytes .current_memory_bytes .tags .boot: BootFiles .unmovable .xml
        .disks: DiskInfo(target, device, type, source, format, bus, readonly, shareable,
                         backing_chain: (BackingFile(path, format, virtual_size, allocated_size)..),
                         chain_source: "libvirt"|"qemu-img"|"unavailable",
                         virtual_size, allocated_size)
        .interfaces: InterfaceInfo(type, source, mac, model)
    (which files a migration moves is the migration plan's ``files``, built from ``.disks``)
    check_migratable(info, disk_map=None)   UnsupportedDeviceError / MappingError naming devices

Tags live in ``<metadata>`` as ``<migsec:tags xmlns:migsec="https://migsec.example/xmlns/1">
<migsec:tag>…</migsec:tag></migsec:tags>`` (TAGS_NS); ``set_tags(conn, name, tags)`` writes them.

Operations (name_or_uuid everywhere)::

    mark_moved(conn, name, MovedMark(migration_id, destination, at)), moved_mark(conn, name),
    clear_moved(conn, name) -> the removed MovedMark or None: the "given away" mark on a kept
    persistent definition (``migsec.handover``; the hook refuses to start a marked domain)

    domain_state, domain_xml(inactive=, migratable=), suspend_domain, resume_domain,
    save_domain(conn, name, path, bypass_cache=False, paused=None),
    save_image_xml(conn, path), check_save_image(conn, path, uuid=, name=None) -> xml,
    save_image_restore_xml(conn, path, uuid=, disk_map=, network_map=, bridge_map=) -> xml,
    restore_domain(conn, path, xml=None, paused=None, bypass_cache=False) -> name,
    restore_name(xml) -> the name that restore gives the domain (before restoring),
    define_domain(conn, xml) -> name, undefine_domain(conn, name, keep_nvram=False),
    destroy_domain, start_domain(paused=False)

``paused``: True/False ask libvirt for the paused/running flag, None keeps the saved state.
Flags a driver refuses raise OperationUnsupportedError; nothing falls back silently.

Images (qemu-img, formats always given, never probed)::

    image_chain(path, format=) -> (ImageInfo(path, format, virtual_size, allocated_size, backing), ...)
    rebase_image(path, backing=, backing_format=, format="qcow2")   # header only, after a move

XML rewrite (an lxml tree, never string edits; input parsed as untrusted)::

    rewrite_domain_xml(xml, disk_map={src_dir_or_file: dst}, network_map=None, bridge_map=None)

Incoming live migration (B's rule, ``RpcPolicy.rewrite_xml`` of the libvirt RPC filter)::

    incoming_domain_xml(xml, disk_map=, expected_name=, expected_uuid=, network_map=None,
                        bridge_map=None, emulators=None, boot_dirs=FIRMWARE_DIRS,
                        log_dirs=LOG_DIRS) -> xml     raises to refuse (see migsec.virt.incoming)

Errors: every libvirt error becomes a ``migsec.errors.VirtError`` subclass, sorted by
``get_error_code()``: DomainNotFoundError, HypervisorUnavailableError, SaveImageError,
UnsupportedDeviceError, MappingError, and from ``migsec.virt.errors`` DomainStateError,
DomainExistsError, DomainXmlError, OperationUnsupportedError, DiskImageError.
"""
from __future__ import annotations

from migsec.virt.connection import DEFAULT_URI, Connection, HostCapacity, connect, warm_capabilities
from migsec.virt.describe import DomainInfo, DomainState, check_migratable, describe_domain
from migsec.virt.domxml import TAGS_NS, BackingFile, BootFiles, DiskInfo, InterfaceInfo, parse_domain_xml
from migsec.virt.errors import (
    DiskImageError,
    DomainExistsError,
    DomainStateError,
    DomainXmlError,
    OperationUnsupportedError,
)
from migsec.virt.images import ImageInfo, image_chain, rebase_image
from migsec.virt.ops import (
    check_save_image,
    clear_moved,
    mark_moved,
    moved_mark,
    define_domain,
    destroy_domain,
    domain_state,
    domain_xml,
    restore_domain,
    restore_name,
    resume_domain,
    save_domain,
    save_image_restore_xml,
    save_image_xml,
    set_tags,
    start_domain,
    suspend_domain,
    undefine_domain,
)
from migsec.virt.incoming import incoming_domain_xml
from migsec.virt.rewrite import PathMap, rewrite_domain_xml

__all__ = [
    "DEFAULT_URI",
    "TAGS_NS",
    "BackingFile",
    "BootFiles",
    "Connection",
    "DiskImageError",
    "DiskInfo",
    "DomainExistsError",
    "DomainInfo",
    "DomainState",
    "DomainStateError",
    "DomainXmlError",
    "HostCapacity",
    "ImageInfo",
    "InterfaceInfo",
    "OperationUnsupportedError",
    "PathMap",
    "check_migratable",
    "check_save_image",
    "clear_moved",
    "connect",
    "define_domain",
    "describe_domain",
    "destroy_domain",
    "domain_state",
    "domain_xml",
    "image_chain",
    "incoming_domain_xml",
    "mark_moved",
    "moved_mark",
    "parse_domain_xml",
    "rebase_image",
    "restore_domain",
    "restore_name",
    "resume_domain",
    "rewrite_domain_xml",
    "save_domain",
    "save_image_restore_xml",
    "save_image_xml",
    "set_tags",
    "start_domain",
    "suspend_domain",
    "undefine_domain",
    "warm_capabilities",
]

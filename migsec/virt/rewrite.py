"""Rewriting domain XML for the destination host, through the XML tree (never string edits).

Only host-local names change: disk and backing-file paths (by storage-directory
mapping), network names, bridge names, and host files in ``<os>``. Everything
libvirt's ABI-stability check compares on restore (devices, addresses, models,
CPU, memory, uuid, machine type) is left exactly as it was.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath

from lxml import etree

from migsec.errors import MappingError, UnsupportedDeviceError
from migsec.virt.domxml import disk_label, parse_domain_xml, to_string


class PathMap:
    """A storage mapping: source directory or file -> destination directory or file.

    An exact file key wins; otherwise the longest directory key that contains the
    path applies (compared by path components, so ``/img`` does not match
    ``/images``). Paths must be absolute and free of ``.``/``..`` components, so a
    hostile XML cannot climb out of a mapped directory.
    """

    def __init__(self, mapping: Mapping[str, str]) -> None:
        if not isinstance(mapping, Mapping):
            raise MappingError(f"disk map must be a mapping of path -> path, not {type(mapping).__name__}")
        self._map: dict[PurePosixPath, PurePosixPath] = {}
        for src, dst in mapping.items():
            self._map[_clean(src, "disk map source")] = _clean(dst, f"disk map destination for {src!r}")

    def lookup(self, path: str) -> str | None:
        """The mapped path, or None when no key covers ``path``."""
        p = _clean(path, "path")
        if p in self._map:
            return str(self._map[p])
        best: PurePosixPath | None = None
        for key in self._map:
            if p.is_relative_to(key) and (best is None or len(key.parts) > len(best.parts)):
                best = key
        if best is None:
            return None
        return str(self._map[best] / p.relative_to(best))

    def require(self, path: str, what: str) -> str:
        """The mapped path; MappingError naming ``what`` when nothing covers it."""
        try:
            mapped = self.lookup(path)
        except MappingError as exc:
            raise MappingError(f"{what}: {exc}") from None
        if mapped is None:
            keys = ", ".join(sorted(str(k) for k in self._map)) or "none"
            raise MappingError(f"{what}: path '{path}' has no storage mapping (mapped: {keys})")
        return mapped


def _clean(path: object, what: str) -> PurePosixPath:
    if not isinstance(path, str) or not path:
        raise MappingError(f"{what} must be a non-empty path string, got {path!r}")
    if "\x00" in path:
        raise MappingError(f"{what} {path!r} contains a NUL byte")
    if not path.startswith("/"):
        raise MappingError(f"{what} '{path}' is not absolute")
    if any(part in {".", ".."} for part in path.split("/")):
        raise MappingError(f"{what} '{path}' contains '.' or '..' components")
    return PurePosixPath(path)


def is_network_key(key: str) -> bool:
    # "rbd:pool/img" names a network disk; a path never has a scheme-like prefix before "/".
    head, sep, _ = key.partition(":")
    return bool(sep) and bool(head) and "/" not in head


def _map_name(mapping: Mapping[str, str] | None, name: str, what: str, kind: str) -> str:
    if mapping is None:  # no map given: names are the same on both hosts
        return name
    if name not in mapping:
        known = ", ".join(sorted(mapping)) or "none"
        raise MappingError(f"{what}: {kind} '{name}' has no mapping at the destination (mapped: {known})")
    new = mapping[name]
    if not isinstance(new, str) or not new:
        raise MappingError(f"{what}: {kind} mapping for '{name}' is not a name: {new!r}")
    return new


def _rewrite_backing(node: etree._Element | None, paths: PathMap, label: str) -> None:
    depth = 0
    while node is not None and len(node):
        depth += 1
        src = node.find("source")
        if src is not None:
            for attr in ("file", "dev"):
                if src.get(attr):
                    src.set(attr, paths.require(src.get(attr), f"{label} backing file #{depth}"))
        node = node.find("backingStore")


def _rewrite_disk(disk: etree._Element, paths: PathMap, network_disks: Mapping[str, str]) -> None:
    label = disk_label(disk)
    dtype = disk.get("type", "file")
    src = disk.find("source")
    if src is None:
        return  # empty cdrom/floppy: nothing host-local
    if dtype == "file":
        if src.get("file"):
            src.set("file", paths.require(src.get("file"), label))
    elif dtype == "block":
        src.set("dev", paths.require(src.get("dev", ""), f"{label} (block device)"))
    elif dtype == "network":
        key = f"{src.get('protocol', '')}:{src.get('name', '')}"
        if key not in network_disks:
            raise MappingError(f"{label}: network disk '{key}' has no mapping (map it by '{key}')")
        src.set("name", network_disks[key])
    else:
        raise UnsupportedDeviceError(f"{label}: disk type '{dtype}' cannot be rewritten for another host")
    _rewrite_backing(disk.find("backingStore"), paths, label)


def _rewrite_interface(
    iface: etree._Element,
    network_map: Mapping[str, str] | None,
    bridge_map: Mapping[str, str] | None,
) -> None:
    mac = iface.find("mac")
    label = f"interface {mac.get('address')}" if mac is not None else "interface"
    src = iface.find("source")
    if src is None:
        return
    itype = iface.get("type")
    if itype == "network" and src.get("network"):
        src.set("network", _map_name(network_map, src.get("network"), label, "network"))
        # bridge/portid in live XML describe the source host's port; libvirt allocates new ones.
        for runtime in ("bridge", "portid"):
            if runtime in src.attrib:
                del src.attrib[runtime]
    elif itype == "bridge" and src.get("bridge"):
        src.set("bridge", _map_name(bridge_map, src.get("bridge"), label, "bridge"))


def rewrite_domain_xml(
    xml: str | bytes,
    *,
    disk_map: Mapping[str, str],
    network_map: Mapping[str, str] | None = None,
    bridge_map: Mapping[str, str] | None = None,
) -> str:
    """Return ``xml`` with host-local names mapped for the destination.

    ``disk_map`` maps source directories or files to destination ones and must
    cover every disk, backing file and ``<nvram>``; keys of the form
    ``"<protocol>:<name>"`` map network disks to a new image name.
    ``<kernel>``/``<initrd>``/``<dtb>``/``<loader>`` are mapped when covered and
    kept otherwise (firmware is often the same file on every host).
    ``network_map``/``bridge_map``: None keeps names; a dict must cover every
    network/bridge in use. Raises MappingError naming the device that has no mapping.
    """
    root = parse_domain_xml(xml)
    if not isinstance(disk_map, Mapping):
        raise MappingError(f"disk map must be a mapping of path -> path, not {type(disk_map).__name__}")
    network_disks = {k: v for k, v in disk_map.items() if isinstance(k, str) and is_network_key(k)}
    paths = PathMap({k: v for k, v in disk_map.items() if k not in network_disks})
    for disk in root.iterfind("devices/disk"):
        _rewrite_disk(disk, paths, network_disks)
    for iface in root.iterfind("devices/interface"):
        _rewrite_interface(iface, network_map, bridge_map)
    os_ = root.find("os")
    if os_ is not None:
        for tag in ("kernel", "initrd", "dtb", "loader"):
            elem = os_.find(tag)
            if elem is not None and elem.text and elem.text.strip():
                mapped = paths.lookup(elem.text.strip())
                if mapped is not None:
                    elem.text = mapped
        nvram = os_.find("nvram")
        if nvram is not None and nvram.text and nvram.text.strip():
            nvram.text = paths.require(nvram.text.strip(), "<nvram> (UEFI variable store)")
    return to_string(root)

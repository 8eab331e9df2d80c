"""The ``restore begin`` filter: map a foreign domain XML onto this host's storage and networks.

libvirt runs the restore hook for every restore on the host, managed-save restores of
local VMs at boot included, so the filter must tell a foreign XML from a local one:

- a path is *local* when it exists on this host; local paths are never changed;
- the XML is *foreign* when some disk source (or backing file) is missing here and lies
  under a source directory (or is a source file) of ``[storage] map``;
- only a foreign XML is rewritten: every missing path covered by the map is mapped
  (disks, backing files, ``<kernel>``/``<initrd>``/``<dtb>``/``<loader>``/``<nvram>``),
  and interface networks/bridges named in ``[network] map``/``bridge_map`` are renamed.

Only host-local names change (paths and network names), never guest hardware, so the
result passes libvirt's ABI-stability check. The XML is parsed as untrusted (no DTD, no
entities, no network). This module deliberately does not import ``migsec.virt`` (which
loads libvirt): a hook must stay light and must not touch libvirt.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import Any

from migsec import safexml
from migsec.errors import MappingError

MAX_XML = 16 * 1024 * 1024
_OS_FILES = ("kernel", "initrd", "dtb", "loader", "nvram")


class StorageMap:
    """Source directory or file -> local directory or file; exact file keys win, then the
    longest directory (by path components, so ``/img`` does not cover ``/images``)."""

    def __init__(self, mapping: Mapping[str, str]) -> None:
        self._map = {_clean(k, "[storage].map source"): _clean(v, f"[storage].map target of {k!r}")
                     for k, v in mapping.items()}

    def lookup(self, path: str) -> str | None:
        p = _clean(path, "path")
        if p in self._map:
            return str(self._map[p])
        best = max((k for k in self._map if p.is_relative_to(k)), key=lambda k: len(k.parts),
                   default=None)
        return None if best is None else str(self._map[best] / p.relative_to(best))


def _clean(path: object, what: str) -> PurePosixPath:
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        raise MappingError(f"{what} {path!r} is not an absolute path")
    if any(part in (".", "..") for part in path.split("/")):
        raise MappingError(f"{what} {path!r} contains '.' or '..'")
    return PurePosixPath(path)


def parse_domain(xml: bytes):
    """An lxml tree of a ``<domain>`` document, parsed as untrusted input."""
    return safexml.parse_domain(xml, max_size=MAX_XML, error=MappingError, where=" on stdin")


def _path_nodes(root: Any) -> list[tuple[Any, str | None, str]]:
    """(element, attribute or None for text, label) for every host path in the XML."""
    nodes: list[tuple[Any, str | None, str]] = []  # lxml elements (lxml is untyped)
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        label = f"disk {target.get('dev')}" if target is not None else "disk"
        for depth, src in enumerate(disk.iter("source")):
            for attr in ("file", "dev"):
                if src.get(attr):
                    nodes.append((src, attr, label if depth == 0 else f"{label} backing file"))
    os_ = root.find("os")
    for tag in _OS_FILES:
        elem = os_.find(tag) if os_ is not None else None
        if elem is not None and elem.text and elem.text.strip():
            nodes.append((elem, None, f"<{tag}>"))
    return nodes


def map_restore_xml(xml: bytes, *, storage_map: Mapping[str, str],
                    network_map: Mapping[str, str] | None = None,
                    bridge_map: Mapping[str, str] | None = None,
                    exists: Callable[[str], bool] = os.path.exists) -> str | None:
    """The rewritten XML, or None when it is local (or nothing applies): print nothing then."""
    from lxml import etree

    root = parse_domain(xml)
    paths = StorageMap(storage_map)
    changes: list[tuple[Any, str | None, str]] = []
    foreign = False
    for elem, attr, label in _path_nodes(root):
        current = elem.get(attr) if attr else elem.text.strip()
        if exists(current):
            continue
        mapped = paths.lookup(current)
        if mapped is None:
            continue
        changes.append((elem, attr, mapped))
        foreign = foreign or label.startswith("disk")
    if not foreign:
        return None
    for elem, attr, mapped in changes:
        if attr:
            elem.set(attr, mapped)
        else:
            elem.text = mapped
    networks: Mapping[str, str] = network_map or {}
    bridges: Mapping[str, str] = bridge_map or {}
    for iface in root.iterfind("devices/interface"):
        src = iface.find("source")
        if src is None:
            continue
        if iface.get("type") == "network" and src.get("network") in networks:
            src.set("network", networks[src.get("network")])
            # the source host's port and bridge; libvirt allocates new ones here
            for runtime in ("bridge", "portid"):
                src.attrib.pop(runtime, None)
        elif iface.get("type") == "bridge" and src.get("bridge") in bridges:
            src.set("bridge", bridges[src.get("bridge")])
    return etree.tostring(root, encoding="unicode")

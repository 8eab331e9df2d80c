"""Domain XML as data: safe parsing and the read-only views describe and rewrite share.

XML from libvirt on this host is trusted-ish; XML from a peer (a save image or a
migration request) is not, so everything here parses with entity expansion,
network access and DTDs off, and refuses documents that carry a DOCTYPE.
"""
from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from migsec import safexml
from migsec.virt.errors import DomainXmlError

TAGS_NS = "https://migsec.example/xmlns/1"
"""Namespace of migsec's ``<metadata>`` element: ``<tags xmlns=TAGS_NS><tag>..</tag></tags>``."""
TAGS_PREFIX = "migsec"

_MAX_XML = 4 * 1024 * 1024  # a domain XML is a few KiB; refuse anything absurd before parsing

_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 1000, "k": 1024, "kib": 1024,
    "mb": 1000**2, "m": 1024**2, "mib": 1024**2,
    "gb": 1000**3, "g": 1024**3, "gib": 1024**3,
    "tb": 1000**4, "t": 1024**4, "tib": 1024**4,
}


def parse_domain_xml(xml: str | bytes) -> etree._Element:
    """Parse domain XML safely; DomainXmlError names what is wrong."""
    if isinstance(xml, str):
        data = xml.encode("utf-8")
    elif isinstance(xml, bytes):
        data = xml
    else:
        raise DomainXmlError(f"domain XML must be str or bytes, not {type(xml).__name__}")
    return safexml.parse_domain(data, max_size=_MAX_XML, error=DomainXmlError)


def to_string(root: etree._Element) -> str:
    return etree.tostring(root, encoding="unicode")


def memory_bytes(elem: etree._Element | None, what: str) -> int | None:
    """Bytes in a libvirt ``<memory unit=...>`` style element."""
    if elem is None or elem.text is None:
        return None
    unit = (elem.get("unit") or "KiB").lower()
    if unit not in _UNITS:
        raise DomainXmlError(f"<{what}> has unknown unit {elem.get('unit')!r}")
    try:
        value = int(elem.text.strip())
    except ValueError as exc:
        raise DomainXmlError(f"<{what}> is not an integer: {elem.text!r}") from exc
    if value < 0:
        raise DomainXmlError(f"<{what}> is negative: {value}")
    return value * _UNITS[unit]


@dataclass(frozen=True)
class BackingFile:
    """One image below a disk's top image, nearest first."""

    path: str
    format: str | None
    virtual_size: int | None = None
    allocated_size: int | None = None


@dataclass(frozen=True)
class DiskInfo:
    """A ``<disk>`` of a domain.

    ``source`` is the file path (type file), device path (type block),
    ``"<protocol>:<name>"`` (type network), ``"<pool>/<volume>"`` (type volume),
    or None for an empty drive. ``chain_source`` says where ``backing_chain``
    came from: ``"libvirt"`` (the live XML), ``"qemu-img"``, or ``"unavailable"``
    (the image is not readable from here, e.g. a remote host).
    """

    target: str
    device: str
    type: str
    source: str | None
    format: str | None
    bus: str | None = None
    readonly: bool = False
    shareable: bool = False
    backing_chain: tuple[BackingFile, ...] = ()
    chain_source: str = "unavailable"
    virtual_size: int | None = None
    allocated_size: int | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """Every local file this disk needs moved: the top image and its backing files."""
        if self.type != "file" or self.source is None:
            return ()
        return (self.source, *(b.path for b in self.backing_chain))


@dataclass(frozen=True)
class InterfaceInfo:
    """An ``<interface>``: ``source`` is the network, bridge or device name."""

    type: str
    source: str | None
    mac: str | None
    model: str | None


@dataclass(frozen=True)
class BootFiles:
    """Host files named in ``<os>``: direct kernel boot and firmware."""

    kernel: str | None = None
    initrd: str | None = None
    dtb: str | None = None
    loader: str | None = None
    nvram: str | None = None


@dataclass(frozen=True)
class XmlView:
    """What the domain XML alone says (no libvirt calls)."""

    name: str
    uuid: str
    domain_type: str
    vcpus: int
    max_vcpus: int
    memory_bytes: int
    current_memory_bytes: int
    disks: tuple[DiskInfo, ...]
    interfaces: tuple[InterfaceInfo, ...]
    tags: tuple[str, ...]
    boot: BootFiles
    unmovable: tuple[str, ...] = ()


def _text(root: etree._Element, path: str) -> str | None:
    elem = root.find(path)
    return None if elem is None or elem.text is None else elem.text.strip()


def disk_source(disk: etree._Element) -> str | None:
    dtype = disk.get("type", "file")
    src = disk.find("source")
    if src is None:
        return None
    if dtype == "file":
        return src.get("file")
    if dtype == "block":
        return src.get("dev")
    if dtype == "network":
        return f"{src.get('protocol', '')}:{src.get('name', '')}"
    if dtype == "volume":
        return f"{src.get('pool', '')}/{src.get('volume', '')}"
    if dtype == "dir":
        return src.get("dir")
    return None


def disk_label(disk: etree._Element) -> str:
    target = disk.find("target")
    dev = target.get("dev") if target is not None else None
    return f"disk '{dev}'" if dev else f"disk with source {disk_source(disk)!r}"


def _xml_backing_chain(disk: etree._Element) -> tuple[BackingFile, ...] | None:
    """The chain libvirt wrote into live XML, or None when libvirt wrote none."""
    chain: list[BackingFile] = []
    node = disk.find("backingStore")
    if node is None:
        return None
    while node is not None and len(node):  # an empty <backingStore/> ends the chain
        src = node.find("source")
        fmt = node.find("format")
        path = src.get("file") or src.get("dev") if src is not None else None
        if path is None:
            raise DomainXmlError(f"{disk_label(disk)} has a <backingStore> without a source path")
        chain.append(BackingFile(path=path, format=fmt.get("type") if fmt is not None else None))
        node = node.find("backingStore")
    return tuple(chain)


def _disk(disk: etree._Element) -> DiskInfo:
    target = disk.find("target")
    driver = disk.find("driver")
    chain = _xml_backing_chain(disk)
    return DiskInfo(
        target=target.get("dev", "") if target is not None else "",
        device=disk.get("device", "disk"),
        type=disk.get("type", "file"),
        source=disk_source(disk),
        format=driver.get("type") if driver is not None else None,
        bus=target.get("bus") if target is not None else None,
        readonly=disk.find("readonly") is not None,
        shareable=disk.find("shareable") is not None,
        backing_chain=chain or (),
        chain_source="libvirt" if chain is not None else "unavailable",
    )


def _interface(iface: etree._Element) -> InterfaceInfo:
    itype = iface.get("type", "")
    src = iface.find("source")
    source = None
    if src is not None:
        source = {"network": src.get("network"), "bridge": src.get("bridge")}.get(itype) or src.get("dev")
    mac = iface.find("mac")
    model = iface.find("model")
    return InterfaceInfo(
        type=itype,
        source=source,
        mac=mac.get("address") if mac is not None else None,
        model=model.get("type") if model is not None else None,
    )


def tags_of(root: etree._Element) -> tuple[str, ...]:
    """Tags from ``<metadata><tags xmlns=TAGS_NS><tag>…</tag></tags></metadata>``."""
    out: list[str] = []
    for tags in root.iterfind(f"metadata/{{{TAGS_NS}}}tags"):
        for tag in tags:
            if etree.QName(tag).localname == "tag" and tag.text and tag.text.strip():
                out.append(tag.text.strip())
    return tuple(out)


def tags_element(tags: list[str] | tuple[str, ...]) -> str:
    """The metadata element libvirt's setMetadata expects for ``tags``.

    libvirt puts the element into TAGS_NS itself and refuses one that already
    carries a namespace, so this one has none.
    """
    if isinstance(tags, str):
        raise DomainXmlError("tags must be a list of strings, not one string")
    root = etree.Element("tags")
    for t in tags:
        if not isinstance(t, str) or not t.strip():
            raise DomainXmlError(f"invalid tag {t!r}: tags are non-empty strings")
        etree.SubElement(root, "tag").text = t.strip()
    return to_string(root)


def _attr(elem: etree._Element, path: str, attr: str) -> str:
    child = elem.find(path)
    return (child.get(attr) if child is not None else None) or "?"


def _unmovable(root: etree._Element) -> tuple[str, ...]:
    """Devices cold migration cannot carry (host hardware or host state), for an error message."""
    found: list[str] = []
    for hd in root.iterfind("devices/hostdev"):
        addr = hd.find("source/address")
        where = " ".join(f"{k}={v}" for k, v in addr.attrib.items()) if addr is not None else "?"
        found.append(f"hostdev passthrough ({hd.get('type', '?')} {where})")
    for fs in root.iterfind("devices/filesystem"):
        found.append(f"filesystem passthrough '{_attr(fs, 'target', 'dir')}'")
    for iface in root.iterfind("devices/interface"):
        if iface.get("type") in {"hostdev", "vhostuser", "vdpa"}:
            found.append(f"interface type '{iface.get('type')}' (mac {_attr(iface, 'mac', 'address')})")
    for tpm in root.iterfind("devices/tpm"):
        found.append(f"tpm with backend '{_attr(tpm, 'backend', 'type')}'")
    for rd in root.iterfind("devices/redirdev"):
        found.append(f"USB redirection ({rd.get('type', '?')})")
    for sc in root.iterfind("devices/smartcard"):
        if sc.get("mode") == "host":
            found.append("host smartcard")
    return tuple(found)


def view(root: etree._Element) -> XmlView:
    """Read the facts migsec needs from a parsed domain XML."""
    name = _text(root, "name")
    uuid = _text(root, "uuid")
    if not name:
        raise DomainXmlError("domain XML has no <name>")
    if not uuid:
        raise DomainXmlError(f"domain XML for '{name}' has no <uuid>")
    vcpu = root.find("vcpu")
    try:
        max_vcpus = int(vcpu.text.strip()) if vcpu is not None and vcpu.text else 1
        vcpus = int(vcpu.get("current", max_vcpus)) if vcpu is not None else 1
    except ValueError as exc:
        raise DomainXmlError(f"domain '{name}' has a non-integer <vcpu>") from exc
    memory = memory_bytes(root.find("memory"), "memory") or 0
    current = memory_bytes(root.find("currentMemory"), "currentMemory") or memory
    os_ = root.find("os")
    boot = BootFiles()
    if os_ is not None:
        boot = BootFiles(
            kernel=_text(os_, "kernel"),
            initrd=_text(os_, "initrd"),
            dtb=_text(os_, "dtb"),
            loader=_text(os_, "loader"),
            nvram=_text(os_, "nvram"),
        )
    return XmlView(
        name=name,
        uuid=uuid.lower(),
        domain_type=root.get("type", ""),
        vcpus=vcpus,
        max_vcpus=max_vcpus,
        memory_bytes=memory,
        current_memory_bytes=current,
        disks=tuple(_disk(d) for d in root.iterfind("devices/disk")),
        interfaces=tuple(_interface(i) for i in root.iterfind("devices/interface")),
        tags=tags_of(root),
        boot=boot,
        unmovable=_unmovable(root),
    )

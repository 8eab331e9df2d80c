"""B's rule for the domain XML of an incoming live migration (``RpcPolicy.rewrite_xml``).

A's libvirtd sends the destination XML (and the persistent definition) it wants B's
libvirtd to run. B never takes it as it is: ``incoming_domain_xml`` checks it against B's
own storage and network mapping and returns the XML B passes on, or raises (the RPC filter
then refuses the call). The rule:

- the domain is the one of the signed request (name and uuid);
- no element in a foreign namespace outside ``<metadata>`` (``qemu:commandline``,
  ``qemu:override``, ``qemu:capabilities``...), no ``<hostdev>``, ``<filesystem>``, evdev or
  passthrough ``<input>``, passthrough TPM, host ``<smartcard>``, interfaces other than
  network/bridge/user, ``<portForward>`` (ports opened on B), host-side character devices
  (serial, console, parallel, channel, redirdev, smartcard, egd rng) other than
  pty/null/vc/spice/unix/file/pipe, audio backends other than none/spice/dbus/file;
- a domain ``<seclabel>`` must be dynamic and relabelling (it is dropped: B's libvirt labels
  the guest itself); a static label could run QEMU under any label, a device label is refused;
- the ``<emulator>`` is one of the host's (``emulators``; by default a QEMU binary in
  ``/usr/bin`` or ``/usr/libexec``);
- graphics listen only on loopback; a writable pflash ``<loader>`` must be the guest's own
  file (in mapped storage), never a shared firmware image;
- every host path: disk sources and backing files, character device files and sockets,
  ``<nvram>``, kernel/initrd/dtb/loader, fw_cfg ``<sysinfo>`` files, every other attribute or
  text that is an absolute path (outside metadata, description, title, cmdline, resource), is mapped by ``disk_map`` (a source directory or file of A) or already lies
  inside a mapped destination directory or file (A may send B's paths); boot files may also
  lie in ``boot_dirs`` (read-only firmware/kernels), console logs in ``log_dirs``, rng backends
  are the host's random devices. Anything else is refused, so a hostile XML can neither open
  an arbitrary file on B (e.g. ``/etc/shadow`` as an initrd) nor write one;
- networks and bridges are renamed by ``network_map``/``bridge_map`` (a name already on B's
  side of the map is kept; None keeps every name).

Only host-local names change, never guest hardware, so the result passes libvirt's
ABI-stability check. Errors: ``MappingError`` (no mapping), ``UnsupportedDeviceError``
(refused device), ``DomainXmlError`` (not our domain, bad XML).
"""
from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Collection, Mapping
from pathlib import PurePosixPath

from lxml import etree

from migsec.errors import MappingError, UnsupportedDeviceError
from migsec.virt.domxml import disk_label, parse_domain_xml, to_string
from migsec.virt.errors import DomainXmlError
from migsec.virt.rewrite import PathMap, is_network_key

FIRMWARE_DIRS = ("/usr/share/OVMF", "/usr/share/AAVMF", "/usr/share/qemu", "/usr/share/seabios",
                 "/usr/share/edk2", "/usr/share/qemu-efi-aarch64", "/usr/lib/ipxe")
LOG_DIRS = ("/var/log/libvirt/qemu",)
RNG_DEVICES = ("/dev/urandom", "/dev/random", "/dev/hwrng")
_EMULATOR = re.compile(r"/usr/(bin|libexec)/(qemu-system-[a-z0-9_]+|qemu-kvm|kvm)")

_CHARDEV_TAGS = ("serial", "console", "parallel", "channel", "redirdev", "smartcard")
_AUDIO_TYPES = {"none", "spice", "dbus", "file"}
_CHARDEV_TYPES = {"pty", "null", "vc", "spicevmc", "spiceport", "qemu-vdagent", "dbus",
                  "unix", "file", "pipe"}
_INTERFACE_TYPES = {"network", "bridge", "user"}
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_BOOT_TAGS = ("kernel", "initrd", "dtb", "loader")


def incoming_domain_xml(
    xml: str | bytes,
    *,
    disk_map: Mapping[str, str],
    expected_name: str,
    expected_uuid: str,
    network_map: Mapping[str, str] | None = None,
    bridge_map: Mapping[str, str] | None = None,
    emulators: Collection[str] | None = None,
    boot_dirs: Collection[str] = FIRMWARE_DIRS,
    log_dirs: Collection[str] = LOG_DIRS,
) -> str:
    """The XML B's libvirtd may run for the incoming domain ``xml``; raises to refuse."""
    root = parse_domain_xml(xml)
    _check_identity(root, expected_name, expected_uuid)
    _check_namespaces(root)
    _check_seclabels(root)
    places = _Places(disk_map, boot_dirs, log_dirs)
    devices = root.find("devices")
    if devices is not None:
        _check_emulator(devices, emulators)
        for elem in devices:
            if not isinstance(elem.tag, str):
                continue
            _check_device(elem, places, network_map, bridge_map)
    os_ = root.find("os")
    if os_ is not None:
        for tag in _BOOT_TAGS:
            for elem in os_.iterfind(tag):
                if elem.text and elem.text.strip():
                    elem.text = places.boot_file(elem.text.strip(), f"<{tag}>")
        for nvram in os_.iterfind("nvram"):
            if nvram.text and nvram.text.strip():
                nvram.text = places.storage(nvram.text.strip(), "<nvram> (UEFI variable store)")
    _check_loader(os_, places)
    places.verify_all(root)
    return to_string(root)


def _check_loader(os_: etree._Element | None, places: "_Places") -> None:
    """A writable firmware file must be the guest's own (mapped storage), never a shared one."""
    loader = os_.find("loader") if os_ is not None else None
    if loader is None or not (loader.text or "").strip():
        return
    writable = loader.get("type") == "pflash" and loader.get("readonly", "no") != "yes"
    if writable and not places.in_storage(loader.text.strip()):
        raise UnsupportedDeviceError(f"<loader> '{loader.text.strip()}' would be writable but lies "
                                     "outside this host's mapped storage")


def _check_identity(root: etree._Element, name: str, uuid: str) -> None:
    got_name = (root.findtext("name") or "").strip()
    if got_name != name:
        raise DomainXmlError(f"incoming domain XML is for domain {got_name!r}, not {name!r}")
    try:
        got_uuid = str(uuidlib.UUID((root.findtext("uuid") or "").strip()))
        want_uuid = str(uuidlib.UUID(uuid))
    except ValueError:
        raise DomainXmlError(f"incoming domain XML for {name!r} has no valid <uuid>") from None
    if got_uuid != want_uuid or len(root.findall("uuid")) != 1 or len(root.findall("name")) != 1:
        raise DomainXmlError(f"incoming domain XML for {name!r} has uuid {got_uuid}, not {want_uuid}")


def _check_namespaces(root: etree._Element) -> None:
    for child in root:
        if not isinstance(child.tag, str) or child.tag == "metadata":
            continue
        for elem in child.iter():
            if isinstance(elem.tag, str) and elem.tag.startswith("{"):
                qname = etree.QName(elem)
                raise UnsupportedDeviceError(
                    f"incoming domain XML carries <{qname.localname}> of namespace "
                    f"{qname.namespace} (qemu:commandline and other hypervisor passthrough "
                    "are refused)")


def _check_seclabels(root: etree._Element) -> None:
    for label in root.findall("seclabel"):
        if label.get("type", "dynamic") != "dynamic" or label.get("relabel", "yes") != "yes":
            raise UnsupportedDeviceError(
                f"incoming domain XML asks for a {label.get('type', 'dynamic')} security label "
                f"(relabel={label.get('relabel', 'yes')}); only dynamic labels are accepted")
        root.remove(label)   # B's libvirt picks its own labels
    for label in root.iterfind("devices//seclabel"):
        raise UnsupportedDeviceError("incoming domain XML sets a device security label "
                                     f"(model {label.get('model')!r}); refused")


def _check_emulator(devices: etree._Element, emulators: Collection[str] | None) -> None:
    for elem in devices.findall("emulator"):
        path = (elem.text or "").strip()
        ok = path in emulators if emulators is not None else bool(_EMULATOR.fullmatch(path))
        if not ok:
            raise UnsupportedDeviceError(f"incoming domain XML names emulator '{path}', not "
                                         "one of this host's QEMU binaries")


def _check_device(elem: etree._Element, places: "_Places", network_map: Mapping[str, str] | None,
                  bridge_map: Mapping[str, str] | None) -> None:
    tag = elem.tag
    if tag in ("hostdev", "filesystem"):
        raise UnsupportedDeviceError(f"incoming domain XML has a <{tag}> (host {tag} passthrough "
                                     "is refused)")
    if tag == "input" and elem.get("type") in ("passthrough", "evdev"):
        raise UnsupportedDeviceError(f"incoming domain XML has an {elem.get('type')} <input> "
                                     "(host input devices are refused)")
    if tag == "tpm" and elem.find("backend") is not None and elem.find("backend").get("type") == "passthrough":
        raise UnsupportedDeviceError("incoming domain XML has a passthrough TPM (refused)")
    if tag == "disk":
        _disk(elem, places)
    elif tag == "interface":
        _interface(elem, network_map, bridge_map)
    elif tag in _CHARDEV_TAGS:
        if tag == "smartcard" and elem.get("mode") != "passthrough":
            raise UnsupportedDeviceError(f"a host <smartcard mode='{elem.get('mode')}'> is refused")
        if tag in ("serial", "console", "parallel", "channel") or elem.get("type"):
            _chardev(elem, places)
    elif tag == "audio" and elem.get("type", "none") not in _AUDIO_TYPES:
        raise UnsupportedDeviceError(f"<audio type='{elem.get('type')}'> (a host audio backend) "
                                     "is refused")

    elif tag == "graphics":
        _graphics(elem)
    elif tag == "rng":
        backend = elem.find("backend")
        if backend is not None and backend.get("model") == "egd":
            _chardev(backend, places)
        if backend is not None and backend.get("model") == "random":
            path = (backend.text or "").strip()
            if path and path not in RNG_DEVICES:
                raise UnsupportedDeviceError(f"incoming domain XML reads rng from '{path}', "
                                             "not a random device")
            places.exempt(backend)


def _disk(disk: etree._Element, places: "_Places") -> None:
    label = disk_label(disk)
    dtype = disk.get("type", "file")
    if dtype not in ("file", "block", "network"):
        raise UnsupportedDeviceError(f"{label}: disk type '{dtype}' is refused for an incoming "
                                     "migration")
    if disk.find("mirror") is not None:
        raise UnsupportedDeviceError(f"{label}: a block job <mirror> is refused")
    if dtype == "network":
        src = disk.find("source")
        if src is None:
            raise UnsupportedDeviceError(f"{label}: network disk without a <source>")
        key = f"{src.get('protocol', '')}:{src.get('name', '')}"
        if key in places.network_disks:
            src.set("name", places.network_disks[key])
        elif src.get("name") not in places.network_disks.values():
            raise MappingError(f"{label}: network disk '{key}' has no mapping on this host")
    for depth, src in enumerate(disk.iter("source")):
        for attr in ("file", "dev"):
            if src.get(attr):
                what = label if depth == 0 else f"{label} backing file"
                src.set(attr, places.storage(src.get(attr), what))


def _map_name(mapping: Mapping[str, str] | None, name: str, what: str) -> str:
    if mapping is None:
        return name
    if name in mapping:
        return mapping[name]
    if name in mapping.values():
        return name
    raise MappingError(f"{what} '{name}' has no mapping on this host")


def _interface(iface: etree._Element, network_map: Mapping[str, str] | None,
               bridge_map: Mapping[str, str] | None) -> None:
    itype = iface.get("type")
    mac = iface.find("mac")
    label = f"interface {mac.get('address')}" if mac is not None else "interface"
    if itype not in _INTERFACE_TYPES:
        raise UnsupportedDeviceError(f"{label}: interface type '{itype}' is refused (only "
                                     "network, bridge and user)")
    if iface.find("portForward") is not None:
        raise UnsupportedDeviceError(f"{label}: <portForward> (ports opened on this host) is refused")
    src = iface.find("source")
    if src is None:
        return
    if itype == "network" and src.get("network"):
        src.set("network", _map_name(network_map, src.get("network"), f"{label}: network"))
        for runtime in ("bridge", "portid"):   # the source host's port; B allocates its own
            src.attrib.pop(runtime, None)
    elif itype == "bridge" and src.get("bridge"):
        src.set("bridge", _map_name(bridge_map, src.get("bridge"), f"{label}: bridge"))


def _chardev(dev: etree._Element, places: "_Places") -> None:
    ctype = dev.get("type", "pty")
    label = f"<{dev.tag} type='{ctype}'>"
    if ctype not in _CHARDEV_TYPES:
        raise UnsupportedDeviceError(f"{label}: host character device type '{ctype}' is refused")
    for src in dev.findall("source"):
        if ctype == "pty":
            src.attrib.pop("path", None)   # the source host's /dev/pts/N, an output only
            if not src.attrib and not len(src):
                dev.remove(src)
        elif src.get("path"):
            src.set("path", places.storage(src.get("path"), label))
    if ctype == "pty":
        dev.attrib.pop("tty", None)
    for log in dev.findall("log"):
        if log.get("file"):
            log.set("file", places.log_file(log.get("file"), f"{label} log"))


def _graphics(gfx: etree._Element) -> None:
    addresses = [gfx.get("listen")] + [lst.get("address") for lst in gfx.findall("listen")]
    for lst in gfx.findall("listen"):
        if lst.get("type") == "network":
            raise UnsupportedDeviceError("graphics listening on a host network is refused")
    for address in addresses:
        if address and address not in _LOOPBACK:
            raise UnsupportedDeviceError(f"graphics listening on {address} is refused (loopback only)")


class _Places:
    """Where host paths may point: mapped storage, boot dirs, log dirs."""

    def __init__(self, disk_map: Mapping[str, str], boot_dirs: Collection[str],
                 log_dirs: Collection[str]) -> None:
        if not isinstance(disk_map, Mapping):
            raise MappingError(f"disk map must be a mapping of path -> path, not {type(disk_map).__name__}")
        self.network_disks = {k: v for k, v in disk_map.items() if is_network_key(k)}
        files = {k: v for k, v in disk_map.items() if k not in self.network_disks}
        self._map = PathMap(files)
        self._dest = PathMap({v: v for v in files.values()})
        self._boot = PathMap({d: d for d in boot_dirs})
        self._logs = PathMap({d: d for d in log_dirs})
        self._exempt: set[etree._Element] = set()

    def _mapped(self, path: str) -> str | None:
        mapped = self._map.lookup(path)
        if mapped is not None:
            return mapped
        return path if self._dest.lookup(path) is not None else None

    def storage(self, path: str, what: str) -> str:
        mapped = self._mapped(path)
        if mapped is None:
            raise MappingError(f"{what}: path '{path}' is outside this host's mapped storage")
        return mapped

    def boot_file(self, path: str, what: str) -> str:
        mapped = self._mapped(path)
        if mapped is not None:
            return mapped
        if self._boot.lookup(path) is not None:
            return path
        raise MappingError(f"{what}: '{path}' is neither in mapped storage nor in a boot directory")

    def log_file(self, path: str, what: str) -> str:
        mapped = self._mapped(path)
        if mapped is not None:
            return mapped
        if self._logs.lookup(path) is not None:
            return path
        raise MappingError(f"{what}: '{path}' is neither in mapped storage nor in a log directory")

    def in_storage(self, path: str) -> bool:
        try:
            return self._dest.lookup(path) is not None
        except MappingError:
            return False

    def exempt(self, elem: etree._Element) -> None:
        self._exempt.add(elem)

    def verify_all(self, root: etree._Element) -> None:
        """The catch-all: every absolute path left in the document must be one we placed.

        Skipped: ``<metadata>``, ``<description>``, ``<title>``, the kernel ``<cmdline>``, the
        cgroup ``<resource>`` partition and ``<launchSecurity>`` (base64 blobs), which hold
        no host paths. ``<sysinfo type='fwcfg'>`` entries with a ``file`` are host files.
        """
        skip = set()
        for tag in ("metadata", "description", "title", "resource", "launchSecurity", "os/cmdline"):
            for elem in root.iterfind(tag):
                skip.update(elem.iter())
        for elem in root.iter():
            if not isinstance(elem.tag, str) or elem in skip:
                continue
            values = [(f"attribute {k}", v) for k, v in elem.attrib.items()]
            if elem.text and elem.text.strip() and elem not in self._exempt:
                values.append(("text", elem.text.strip()))
            for kind, value in values:
                if not value.startswith("/") or elem.tag == "emulator":
                    continue
                if self._is_placed(value, elem.tag):
                    continue
                raise UnsupportedDeviceError(f"<{elem.tag}> {kind} '{value}' is a host path "
                                             "outside this host's mapped storage")

    def _is_placed(self, value: str, tag: str) -> bool:
        try:
            PurePosixPath(value)
            if self._dest.lookup(value) is not None:
                return True
            if tag in _BOOT_TAGS or tag in ("nvram", "table"):
                return self._boot.lookup(value) is not None
            if tag == "log":
                return self._logs.lookup(value) is not None
        except MappingError:
            return False
        return False

"""The migsec test guest: a Debian kernel + busybox initramfs whose workload proves continuity.

Built only from files the apt packages installed (``linux-image-*-cloud-amd64`` and
``busybox-static``), cached by (kernel version, busybox, init script). The init
script (``guest-init.sh``) prints on the serial console a counter every 200 ms,
the SHA-256 of a seeded memory region, and the blocks it writes to ``/dev/vda``;
this module builds the image, writes the domain XML and parses what the guest said.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from xml.etree import ElementTree as ET

from migsec.errors import LabError

DEFAULT_CACHE_DIR = Path(os.environ.get("MIGSEC_GUEST_CACHE", "/var/cache/migsec/guest"))
INIT_SCRIPT = Path(__file__).with_name("guest-init.sh")
BUSYBOX = Path("/bin/busybox")
# Loaded in this order by the init script (each needs the ones before it).
VIRTIO_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
    "virtio_pci", "virtio_blk",
)
# Bumped when the layout of the built image changes, so old caches are not reused.
BUILD_FORMAT = 1

BLOCK_SIZE = 4096
PAYLOAD_SIZE = BLOCK_SIZE - 64
BLOCK_MAGIC = b"MIGSECBLK "
MEM_LINE = 64
MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel and initramfs paths plus the cache key they live under."""

    kernel: Path
    initrd: Path
    kernel_version: str
    key: str


def kernel_versions() -> list[str]:
    """Versions of the Debian cloud kernels installed (newest last)."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*-cloud-amd64"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        if Path("/lib/modules", version).is_dir():
            found.append(version)
    return sorted(found, key=_version_key)


def _version_key(version: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def _module_path(version: str, name: str) -> Path:
    base = Path("/lib/modules", version, "kernel/drivers")
    sub = "block" if name == "virtio_blk" else "virtio"
    path = base / sub / f"{name}.ko"
    if not path.is_file():
        raise LabError(f"kernel module {name} not found at {path} (is linux-image-{version} complete?)")
    return path


def guest_cache_key(kernel_version: str) -> str:
    """Cache key: kernel version + busybox binary + init script + module list."""
    if not BUSYBOX.is_file():
        raise LabError(f"{BUSYBOX} is missing: install busybox-static (scripts/setup.sh)")
    h = hashlib.sha256()
    for part in (str(BUILD_FORMAT), kernel_version, _sha256_file(BUSYBOX),
                 _sha256_file(INIT_SCRIPT), ",".join(VIRTIO_MODULES)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def build_guest(cache_dir: Path | str = DEFAULT_CACHE_DIR, kernel_version: str | None = None,
                *, force: bool = False) -> GuestImage:
    """Build the guest kernel + initramfs once and return the cached copy afterwards."""
    if kernel_version is None:
        versions = kernel_versions()
        if not versions:
            raise LabError("no /boot/vmlinuz-*-cloud-amd64 with modules: install linux-image-cloud-amd64")
        kernel_version = versions[-1]
    vmlinuz = Path("/boot", f"vmlinuz-{kernel_version}")
    if not vmlinuz.is_file():
        raise LabError(f"kernel {vmlinuz} not found")
    key = guest_cache_key(kernel_version)
    out = Path(cache_dir) / key
    image = GuestImage(out / "vmlinuz", out / "initrd.cpio", kernel_version, key)
    if (out / "meta.json").is_file() and not force:
        return image

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # Build in a sibling temporary dir and rename, so a concurrent or interrupted
    # build never leaves a half-written image under the final key.
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        root = work / "root"
        for sub in ("bin", "dev", "proc", "sys", "tmp", "mem", "lib/modules"):
            (root / sub).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        shutil.copy2(INIT_SCRIPT, root / "init")
        os.chmod(root / "init", 0o755)
        for name in VIRTIO_MODULES:
            shutil.copy2(_module_path(kernel_version, name), root / "lib/modules" / f"{name}.ko")
        _write_cpio(root, work / "initrd.cpio")
        shutil.copy2(vmlinuz, work / "vmlinuz")
        (work / "meta.json").write_text(json.dumps(
            {"kernel_version": kernel_version, "key": key, "modules": list(VIRTIO_MODULES)}))
        shutil.rmtree(root)
        os.chmod(work, 0o755)  # readable by QEMU even when it does not run as root
        if force and out.exists():
            shutil.rmtree(out)
        try:
            os.rename(work, out)
        except OSError:
            if not (out / "meta.json").is_file():
                raise
            shutil.rmtree(work)  # a concurrent build finished first; its files are the same
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return image


def _write_cpio(root: Path, dest: Path) -> None:
    # Uncompressed: the kernel would spend longer inflating it under TCG than it saves.
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with open(dest, "wb") as out:
        proc = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            input="\n".join(names).encode() + b"\n", cwd=root, stdout=out,
            stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise LabError(f"cpio failed building the guest initramfs: {proc.stderr.decode().strip()}")


# --- domain XML ------------------------------------------------------------------------
def console_log_path(name: str) -> str:
    """Where a host's libvirt writes the guest's serial console (path inside the host)."""
    return f"/var/log/libvirt/qemu/{name}-console.log"


def guest_domain_xml(name: str, image: GuestImage, disk_path: Path | str, *,
                     memory_mib: int = 256, region_mib: int = 64, seed: str | None = None,
                     domain_type: str = "qemu", disk_format: str = "qcow2",
                     check_seconds: int = 5, disk_seconds: int = 1, dirty_mib: int = 0) -> str:
    """Domain XML for the test guest; the workload parameters ride on the kernel command line."""
    if domain_type not in ("qemu", "kvm"):
        raise LabError(f"domain type must be qemu or kvm, not {domain_type!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise LabError(f"guest name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if region_mib < 1 or region_mib + 64 > memory_mib:
        raise LabError(f"memory region of {region_mib} MiB does not fit a {memory_mib} MiB guest "
                       "(keep 64 MiB for the kernel)")
    seed = seed if seed is not None else name
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,24}", seed):
        raise LabError(f"seed {seed!r}: use 1-24 letters, digits, '.', '_' or '-'")

    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(image.kernel)
    ET.SubElement(os_, "initrd").text = str(image.initrd)
    ET.SubElement(os_, "cmdline").text = (
        f"console=ttyS0 quiet panic=-1 migsec.seed={seed} migsec.mem={region_mib} "
        f"migsec.check={check_seconds} migsec.disk={disk_seconds}"
        + (f" migsec.dirty={int(dirty_mib)}" if dirty_mib else ""))
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "destroy"
    ET.SubElement(dom, "on_crash").text = "destroy"
    dev = ET.SubElement(dom, "devices")
    ET.SubElement(dev, "emulator").text = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    disk = ET.SubElement(dev, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type=disk_format)
    ET.SubElement(disk, "source", file=str(disk_path))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    # A pty (so `virsh console` and disk-check requests work) logged to a file.
    serial = ET.SubElement(dev, "serial", type="pty")
    ET.SubElement(serial, "log", file=console_log_path(name), append="on")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(dev, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    ET.SubElement(dev, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def create_disk(path: Path | str, size: str | int, disk_format: str = "qcow2") -> None:
    """Create an empty (all-zero) disk image with qemu-img."""
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", disk_format, str(path), str(size)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"qemu-img create {path}: {proc.stderr.strip()}")


# --- what the guest printed -----------------------------------------------------------
_COUNT = re.compile(r"^MIGSEC-COUNT (\d+)$")
_BOOT = re.compile(r"MIGSEC-BOOT boot=([0-9a-f]+)")
_MEM = re.compile(r"^MIGSEC-MEM boot=([0-9a-f]+) seq=(\d+) sha256=([0-9a-f]{64}) (ok|BAD)$")
_MEM_INIT = re.compile(r"^MIGSEC-MEM-INIT boot=([0-9a-f]+) mib=(\d+) sha256=([0-9a-f]{64})$")
_DISK = re.compile(r"^MIGSEC-DISK seq=(\d+) block=(\d+) sha256=([0-9a-f]{64})$")
_DISKCHECK = re.compile(r"^MIGSEC-DISKCHECK boot=([0-9a-f]+) blocks=(\d+) bad=(\d+) last=(\d+)$")


@dataclasses.dataclass(frozen=True)
class MemoryCheck:
    boot: str
    seq: int  # 0 for the initial fill
    sha256: str
    ok: bool


@dataclasses.dataclass(frozen=True)
class DiskCheck:
    boot: str
    blocks: int
    bad: int


@dataclasses.dataclass(frozen=True)
class Console:
    """Everything the workload printed, in order; only complete (newline-ended) lines count."""

    boots: list[str]
    counters: list[int]
    memory: list[MemoryCheck]
    disk_writes: list[tuple[int, str]]  # (block, sha256 of its payload)
    disk_checks: list[DiskCheck]
    errors: list[str]


def _read(log: Path | str | bytes) -> str:
    if isinstance(log, bytes):
        return log.decode("utf-8", "replace")
    return Path(log).read_bytes().decode("utf-8", "replace") if Path(log).exists() else ""


def parse_console(log: Path | str | bytes) -> Console:
    """Parse a console log file (or its bytes). A line cut off by a save is ignored."""
    lines = _read(log).split("\n")[:-1]  # the last piece has no newline yet
    c = Console([], [], [], [], [], [])
    for raw in lines:
        line = raw.strip("\r")
        if m := _COUNT.match(line):
            c.counters.append(int(m[1]))
        elif m := _MEM.match(line):
            c.memory.append(MemoryCheck(m[1], int(m[2]), m[3], m[4] == "ok"))
        elif m := _MEM_INIT.match(line):
            c.memory.append(MemoryCheck(m[1], 0, m[3], True))
        elif m := _DISK.match(line):
            c.disk_writes.append((int(m[2]), m[3]))
        elif m := _DISKCHECK.match(line):
            c.disk_checks.append(DiskCheck(m[1], int(m[2]), int(m[3])))
        elif m := _BOOT.search(line):  # may follow the firmware's escape codes
            c.boots.append(m[1])
        elif line.startswith("MIGSEC-ERROR"):
            c.errors.append(line)
    return c


def last_counter(log: Path | str | bytes) -> int | None:
    """The last complete counter value in a console log, or None if there is none."""
    counters = parse_console(log).counters
    return counters[-1] if counters else None


def expected_memory_sha256(seed: str, region_mib: int) -> str:
    """SHA-256 the guest's memory region must have (same pattern as guest-init.sh)."""
    h = hashlib.sha256()
    base = (f"migsec-mem seed={seed}".ljust(MEM_LINE - 1).encode() + b"\n") * (MIB // MEM_LINE - 1)
    for block in range(region_mib):
        h.update(f"migsec-mem seed={seed} block={block}".ljust(MEM_LINE - 1).encode() + b"\n")
        h.update(base)
    return h.hexdigest()


# --- disk verification from the host -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DiskReport:
    blocks: dict[int, str]  # block -> sha256 of the payload stored in it
    bad: list[int]  # blocks whose payload does not match their stored checksum


def verify_disk(image: Path | str, disk_format: str = "qcow2") -> DiskReport:
    """Read the blocks the guest wrote from a (stopped) guest's disk image and check each."""
    image = Path(image)
    if not image.is_file():
        raise LabError(f"disk image {image} does not exist")
    with tempfile.TemporaryDirectory(prefix="migsec-disk-") as tmp:
        raw = image
        if disk_format != "raw":
            raw = Path(tmp) / "disk.raw"
            proc = subprocess.run(["qemu-img", "convert", "-f", disk_format, "-O", "raw",
                                   str(image), str(raw)], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise LabError(f"qemu-img convert {image}: {proc.stderr.strip()}")
        blocks: dict[int, str] = {}
        bad: list[int] = []
        with open(raw, "rb") as f:
            k = 1
            while True:
                f.seek(k * BLOCK_SIZE)
                block = f.read(BLOCK_SIZE)
                if len(block) < BLOCK_SIZE or not block.startswith(BLOCK_MAGIC):
                    break
                payload, stored = block[:PAYLOAD_SIZE], block[PAYLOAD_SIZE:].decode("ascii", "replace")
                blocks[k] = stored
                if hashlib.sha256(payload).hexdigest() != stored:
                    bad.append(k)
                k += 1
    return DiskReport(blocks, bad)

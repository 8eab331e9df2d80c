"""The one-machine lab: N libvirt hosts, each in its own network + mount namespace.

Host ``a`` (198.18.0.1), ``b`` (198.18.0.2), ... each get a network namespace
``<prefix>-<name>`` joined to the others through a bridge in ``<prefix>-sw``, and a
persistent mount namespace (a bind-mounted nsfs file under ``<dir>/ns``) in which
/etc/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt and /run come
from ``<dir>/<name>/``. Each host runs its own virtlogd + libvirtd there. Image
directories (``<dir>/<name>/images``) are not bind-mounted: they have the same,
different, path inside and outside, so moving a guest needs a real storage mapping.

Everything made is recorded in ``<dir>/state.json``; ``down`` also finds what a
crash left (namespaces by name, processes by namespace) so it works on stale state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
import tty
from pathlib import Path
from typing import Any, Iterator

from migsec.errors import LabError
from migsec.fsutil import atomic_write
from migsec.lab import guest as guestmod
from migsec.lab import ns

DEFAULT_DIR = "/var/lib/migsec/lab"
DEFAULT_PREFIX = "migsec"
HOST_NAMES = "abcdefghij"
NETWORK = "198.18.0.0/15"
BRIDGE = "labbr0"
LINK = "lab0"
MARKER = ".migsec-lab"
# Bind-mounted from <host dir>/<sub> inside each host's mount namespace.
BIND_MOUNTS = {
    "etc": "/etc/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
    "run": "/run",
}
SOCKET_PATH_MAX = 107  # sun_path, minus the terminating NUL
REQUIRED_TOOLS = ("ip", "nsenter", "unshare", "mount", "umount", "libvirtd", "virtlogd",
                  "virsh", "qemu-img", "qemu-system-x86_64", "cpio")

LIBVIRTD_CONF = """\
# migsec lab host: root-only unix socket, no TCP, logs inside the host.
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
VIRTLOGD_CONF = """\
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
"""
# QEMU runs as root: the image dirs may sit under a root-only temporary dir, and
# /dev/kvm then needs no group change. cgroups are not delegated to the lab's
# libvirtds (no systemd), and the host is already in a private mount namespace.
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
# QEMU's own TLS (native `virsh migrate --tls`, the live benchmark's baseline) per host
default_tls_x509_cert_dir = "/etc/libvirt/pki/qemu"
"""


def parse_size(text: str | int, *, unit: int = 1) -> int:
    """'256M', '1G', '512MiB', '1073741824' -> bytes (or multiples of ``unit``)."""
    if isinstance(text, int):
        return text // unit
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise LabError(f"size {text!r}: expected a number with an optional K, M, G or T suffix")
    power = " KMGT".index(m[2].upper() or " ")
    return int(m[1]) * 1024 ** power // unit


@dataclasses.dataclass(frozen=True)
class Guest:
    """A test guest defined on one lab host."""

    name: str
    host: str
    disk: Path
    disk_format: str
    memory_mib: int
    region_mib: int
    seed: str


class LabHost:
    """One libvirt host of the lab."""

    def __init__(self, lab: Lab, name: str, index: int) -> None:
        self.lab = lab
        self.name = name
        self.index = index
        self.address = f"198.18.0.{index + 1}"
        self.netns = f"{lab.prefix}-{name}"
        self.dir = lab.dir / name
        self.image_dir = self.dir / "images"
        self.mount_ns = lab.dir / "ns" / f"{name}.mnt"
        self.libvirt_socket = self.dir / "run" / "libvirt" / "libvirt-sock"
        self.libvirt_uri = f"qemu+unix:///system?socket={self.libvirt_socket}"

    def __repr__(self) -> str:
        return f"LabHost({self.name!r}, {self.address}, {self.libvirt_uri!r})"

    def outside(self, inside_path: str | Path) -> Path:
        """Where a path seen inside this host lives outside (bind mounts resolved)."""
        p = str(inside_path)
        for sub, target in sorted(BIND_MOUNTS.items(), key=lambda kv: -len(kv[1])):
            if p == target or p.startswith(target + "/"):
                return self.dir / sub / p[len(target):].lstrip("/")
        return Path(p)

    def console_log(self, domain: str) -> Path:
        """The file (outside path) this host's libvirt writes the guest's serial console to."""
        return self.outside(guestmod.console_log_path(domain))

    def nsenter(self, cwd: str | Path | None = None) -> list[str]:
        """The argv prefix that runs a command inside this host's network + mount namespaces."""
        argv = ["nsenter", f"--net=/run/netns/{self.netns}", f"--mount={self.mount_ns}"]
        if cwd is not None:
            # Entering a mount namespace resets the working directory to its root.
            argv.append(f"--wd={cwd}")
        return argv + ["--"]

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start a process inside this host (same keyword arguments as subprocess.Popen)."""
        cwd = kwargs.pop("cwd", None)
        return subprocess.Popen(self.nsenter(cwd) + [str(a) for a in argv], **kwargs)

    def exec(self, argv: list[str], *, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a command inside this host and wait (keyword arguments as subprocess.run)."""
        cwd = kwargs.pop("cwd", None)
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        kwargs.setdefault("text", True)
        proc = subprocess.run(self.nsenter(cwd) + [str(a) for a in argv], check=False, **kwargs)
        if check and proc.returncode != 0:
            err = (proc.stderr or "").strip() if isinstance(proc.stderr, str) else ""
            raise LabError(f"host {self.name}: {' '.join(map(str, argv))} exited {proc.returncode}"
                           + (f": {err}" if err else ""))
        return proc

    def virsh(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        """Run virsh against this host's libvirtd (from outside; only the socket is needed)."""
        try:
            proc = subprocess.run(["virsh", "-q", "-c", self.libvirt_uri, *args],
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"host {self.name}: virsh {' '.join(args)} timed out") from exc
        if check and proc.returncode != 0:
            raise LabError(f"host {self.name}: virsh {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout


class Lab:
    """The lab under ``dir``; namespace names start with ``prefix``."""

    def __init__(self, dir: str | Path | None = None, prefix: str | None = None) -> None:
        self.dir = Path(dir or os.environ.get("MIGSEC_LAB_DIR") or DEFAULT_DIR).absolute()
        state = self._read_state()
        prefix = prefix or (state or {}).get("prefix") or os.environ.get("MIGSEC_LAB_PREFIX") or DEFAULT_PREFIX
        # Network namespace and interface names must stay short and shell-safe.
        if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", prefix):
            raise LabError(f"lab prefix {prefix!r}: use 1-12 lower-case letters and digits, starting with a letter")
        if state and state.get("prefix") != prefix:
            raise LabError(f"{self.dir} holds a lab with prefix {state.get('prefix')!r}, not {prefix!r}")
        self.prefix = prefix
        self.state_file = self.dir / "state.json"
        self._state: dict = state or {}

    @classmethod
    def load(cls, dir: str | Path | None = None) -> Lab:
        """The lab recorded in ``dir`` (its prefix comes from the state file)."""
        lab = cls(dir)
        if not lab._state:
            raise LabError(f"no lab in {lab.dir} (run `migsec lab up`)")
        return lab

    # --- hosts ---------------------------------------------------------------------
    @property
    def host_names(self) -> list[str]:
        return list(self._state.get("hosts", []))

    def hosts(self) -> list[LabHost]:
        return [self.host(n) for n in self.host_names]

    def host(self, name: str) -> LabHost:
        """The host called ``name`` (``a``, ``b``, ...)."""
        if name not in self.host_names:
            known = ", ".join(self.host_names) or "none: the lab is not up"
            raise LabError(f"no lab host {name!r} (hosts: {known})")
        return LabHost(self, name, HOST_NAMES.index(name))

    def exec(self, host: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        return self.host(host).exec(argv, **kwargs)

    # --- state -----------------------------------------------------------------------
    def _read_state(self) -> dict | None:
        try:
            return json.loads((self.dir / "state.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"lab state {self.dir / 'state.json'} is unreadable: {exc}") from exc

    def _write_state(self) -> None:
        atomic_write(self.state_file, json.dumps(self._state, indent=2, sort_keys=True).encode(),
                     mode=0o666)  # 0o666 less umask, as write_text gave

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock on the parent directory itself: no lock file is left behind, and
        # down can remove the lab dir while holding it.
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- up ----------------------------------------------------------------------------
    def up(self, hosts: int = 2, *, domain_type: str = "qemu", guest: str | None = "vm1",
           guest_memory: str | int = "256M", disk: str | int = "1G", region_mib: int = 64,
           timeout: float = 90) -> dict:
        """Bring the lab up (idempotent) and, unless ``guest`` is None, boot that guest on ``a``."""
        _preflight(domain_type)
        if not 2 <= hosts <= len(HOST_NAMES):
            raise LabError(f"--hosts must be between 2 and {len(HOST_NAMES)}, not {hosts}")
        names = list(HOST_NAMES[:hosts])
        with self._locked():
            self._state = self._read_state() or {}  # another process may have changed it
            if self._state and (self._state.get("hosts") != names
                                or self._state.get("domain_type") != domain_type):
                raise LabError(
                    f"a lab with hosts {self._state.get('hosts')} and domain type "
                    f"{self._state.get('domain_type')} is up in {self.dir}; run `migsec lab down` first")
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / MARKER).touch()
            self._state.update({"prefix": self.prefix, "hosts": names, "domain_type": domain_type,
                                "pids": self._state.get("pids", {})})
            self._write_state()  # before making anything, so a crash here can be torn down
            for h in self.hosts():
                too_long = len(str(h.libvirt_socket)) > SOCKET_PATH_MAX
                if too_long:
                    raise LabError(f"lab dir {self.dir} is too long: {h.libvirt_socket} exceeds "
                                   f"the {SOCKET_PATH_MAX}-byte unix socket path limit")
            self._network()
            ns.private_mount(self.dir / "ns")
            for h in self.hosts():
                self._host_dirs(h)
                self._mount_namespace(h)
                self._daemons(h, timeout)
            self._write_state()
        # A guest that was moved to another host is left there, not booted again on a.
        if guest is not None and not any(guest in h.virsh("list", "--all", "--name").split()
                                         for h in self.hosts() if h.name != "a"):
            self.ensure_guest("a", guest, memory=guest_memory, disk_size=disk, region_mib=region_mib,
                              timeout=timeout)
        return self.status()

    def _network(self) -> None:
        sw = f"{self.prefix}-sw"
        ns.ensure_netns(sw)
        if not ns.link_exists(sw, BRIDGE):
            ns.run(["ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge"])
        ns.run(["ip", "-n", sw, "link", "set", BRIDGE, "up"])
        for h in self.hosts():
            ns.ensure_netns(h.netns)
            ns.run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
            port = f"p{h.name}"
            if not ns.link_exists(h.netns, LINK):
                if ns.link_exists(sw, port):  # half of a pair left by a crash
                    ns.run(["ip", "-n", sw, "link", "del", port])
                ns.run(["ip", "link", "add", LINK, "netns", h.netns, "type", "veth",
                        "peer", "name", port, "netns", sw])
            ns.run(["ip", "-n", sw, "link", "set", port, "master", BRIDGE, "up"])
            ns.run(["ip", "-n", h.netns, "addr", "replace", f"{h.address}/15", "dev", LINK])
            ns.run(["ip", "-n", h.netns, "link", "set", LINK, "up"])
        self._state["netns"] = [sw] + [h.netns for h in self.hosts()]

    def _host_dirs(self, h: LabHost) -> None:
        for sub in (*BIND_MOUNTS, "images", "run/libvirt", "log/qemu", "etc/pki/qemu"):
            (h.dir / sub).mkdir(parents=True, exist_ok=True)
        (h.dir / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (h.dir / "etc" / "virtlogd.conf").write_text(VIRTLOGD_CONF)
        (h.dir / "etc" / "qemu.conf").write_text(QEMU_CONF)

    def _mount_namespace(self, h: LabHost) -> None:
        if ns.is_mountpoint(h.mount_ns):
            return
        h.mount_ns.touch()
        binds = " && ".join(
            f"mkdir -p {target} && mount --bind {h.dir / sub} {target}"
            for sub, target in BIND_MOUNTS.items())
        # sysfs is remounted so that /sys/class/net shows this host's interfaces.
        script = f"set -e; {binds} && mount -t sysfs sysfs /sys"
        ns.run(["nsenter", f"--net=/run/netns/{h.netns}", "unshare", f"--mount={h.mount_ns}",
                "--propagation", "private", "sh", "-c", script])

    def _daemons(self, h: LabHost, timeout: float) -> None:
        pids = self._state["pids"].setdefault(h.name, {})
        for daemon, args in (("virtlogd", ["-d", "-p", "/run/virtlogd.pid"]),
                             ("libvirtd", ["-d", "-p", "/run/libvirtd.pid"])):
            if ns.alive(pids.get(daemon)):
                continue
            pid_file = h.dir / "run" / f"{daemon}.pid"
            pid_file.unlink(missing_ok=True)  # left by a crash; must not be mistaken for the new one
            started = h.dir / "run" / f"{daemon}.started"
            started.unlink(missing_ok=True)
            # under a prompt reaper of its orphans (QEMU), as a real host's init is: migsec.lab.reaper
            with open(h.dir / "log" / f"{daemon}.out", "ab") as out:
                subprocess.run([sys.executable, "-m", "migsec.lab.reaper", str(started), "--",
                                *h.nsenter(), daemon, *args], stdin=subprocess.DEVNULL,
                               stdout=out, stderr=out, check=True, timeout=timeout)
            status = ns.wait_for(lambda: started.read_text().split() if started.exists() else None, timeout,
                                 f"host {h.name}: {daemon} did not start (no {started})")
            if status[0] != "0":
                raise LabError(f"host {h.name}: {daemon} failed to start (exit {status[0]}); "
                               f"see {h.dir / 'log'}")
            pid = ns.wait_for(lambda: ns.read_pid(pid_file), 10,
                              f"host {h.name}: {daemon} wrote no pid file")
            pids[daemon] = [pid, ns.start_time(pid)]
            self._write_state()
        ns.wait_for(lambda: h.virsh("uri", check=False, timeout=10) or None, timeout,
                    f"host {h.name}: libvirtd did not answer on {h.libvirt_socket}")

    # --- guests ------------------------------------------------------------------------
    def define_guest(self, host: str, name: str, *, memory: str | int = "256M",
                     disk_size: str | int = "1G", region_mib: int = 64, seed: str | None = None,
                     disk_format: str = "qcow2", domain_type: str | None = None,
                     check_seconds: int = 5, dirty_mib: int = 0) -> Guest:
        """Build (or reuse) the guest image, create its disk in the host's image dir, define it.

        ``dirty_mib``: MiB of guest memory rewritten every 0.1 s (live-migration benchmarks)."""
        h = self.host(host)
        image = guestmod.build_guest()
        memory_mib = parse_size(memory, unit=1024 * 1024)
        disk_path = h.image_dir / f"{name}.{disk_format}"
        seed = seed or name
        xml = guestmod.guest_domain_xml(
            name, image, disk_path, memory_mib=memory_mib, region_mib=region_mib, seed=seed,
            domain_type=domain_type or self._state.get("domain_type", "qemu"),
            disk_format=disk_format, check_seconds=check_seconds, dirty_mib=dirty_mib)
        if not disk_path.exists():
            guestmod.create_disk(disk_path, parse_size(disk_size), disk_format)
        xml_path = h.image_dir / f"{name}.xml"
        xml_path.write_text(xml)
        h.virsh("define", str(xml_path))
        return Guest(name, host, disk_path, disk_format, memory_mib, region_mib, seed)

    def start_guest(self, host: str, name: str, *, wait: bool = True, timeout: float = 90) -> None:
        """Start a defined guest; with ``wait``, return once its memory region is filled."""
        h = self.host(host)
        log = h.console_log(name)
        before = len(guestmod.parse_console(log).boots)
        h.virsh("start", name)
        if wait:
            def booted() -> bool:
                c = guestmod.parse_console(log)
                if c.errors:
                    raise LabError(f"guest {name} on {host}: {c.errors[0]}")
                return len(c.boots) > before and any(m.seq == 0 and m.boot == c.boots[-1] for m in c.memory)
            ns.wait_for(booted, timeout,
                        f"guest {name} on host {host} did not boot within {timeout:.0f} s (console: {log})")

    def ensure_guest(self, host: str, name: str, *, memory: str | int = "256M",
                     disk_size: str | int = "1G", region_mib: int = 64, timeout: float = 90) -> Guest:
        """Define and start ``name`` on ``host`` unless it already runs there."""
        h = self.host(host)
        g = self.define_guest(host, name, memory=memory, disk_size=disk_size, region_mib=region_mib) \
            if name not in h.virsh("list", "--all", "--name").split() else None
        if name not in h.virsh("list", "--name").split():
            self.start_guest(host, name, timeout=timeout)
        if g is None:
            g = Guest(name, host, h.image_dir / f"{name}.qcow2", "qcow2",
                      parse_size(memory, unit=1024 * 1024), region_mib, name)
        return g

    def request_disk_check(self, host: str, name: str) -> None:
        """Ask the running guest to verify its disk blocks (answer: MIGSEC-DISKCHECK on the console)."""
        h = self.host(host)
        pty = h.virsh("ttyconsole", name).strip()
        if not pty.startswith("/dev/pts/"):
            raise LabError(f"guest {name} on {host} has no console pty (got {pty!r})")
        fd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
        try:
            # Raw, or the pty would echo the guest's own output back into the guest.
            tty.setraw(fd)
            os.write(fd, b"verify\r")
            # QEMU notices a pty client only on its next poll (every second) and drops
            # what is pending when the client leaves, so stay a while, draining output.
            deadline = time.monotonic() + 2.5
            while (left := deadline - time.monotonic()) > 0:
                if select.select([fd], [], [], left)[0]:
                    os.read(fd, 65536)
        finally:
            os.close(fd)

    # --- status and down ------------------------------------------------------------
    def status(self) -> dict:
        """What is up: per host its address, URI, daemons alive and domains."""
        hosts = {}
        for h in self.hosts():
            pids = self._state.get("pids", {}).get(h.name, {})
            alive = {d: ns.alive(pids.get(d)) for d in ("virtlogd", "libvirtd")}
            domains: dict[str, str] = {}
            if alive["libvirtd"]:
                out = h.virsh("list", "--all", check=False, timeout=10)
                for line in out.splitlines():
                    parts = line.split(None, 2)
                    if len(parts) == 3:
                        domains[parts[1]] = parts[2].strip()
            hosts[h.name] = {"address": h.address, "netns": h.netns, "uri": h.libvirt_uri,
                             "image_dir": str(h.image_dir), "daemons": alive, "domains": domains,
                             "netns_exists": Path("/run/netns", h.netns).exists()}
        return {"dir": str(self.dir), "prefix": self.prefix, "up": bool(self._state),
                "domain_type": self._state.get("domain_type"), "hosts": hosts}

    def down(self) -> None:
        """Remove everything the lab made; works on a half-made or crashed lab too."""
        with self._locked():
            state = self._read_state() or {}
            # Refuse before touching anything when dir is not a lab (e.g. a mistyped --dir).
            if self.dir.exists() and not state and not (self.dir / MARKER).exists():
                raise LabError(f"{self.dir} is not a migsec lab dir (no {MARKER}); not touching it")
            names = set(state.get("netns", [])) | set(ns.lab_netns(self.prefix))
            ns_files = sorted((self.dir / "ns").glob("*.mnt")) if (self.dir / "ns").is_dir() else []
            # Everything that runs inside a lab host: daemons, QEMU, whatever was started there.
            namespaces = {ns.ns_inode(Path("/run/netns", n)) for n in names}
            namespaces |= {ns.ns_inode(f) for f in ns_files if ns.is_mountpoint(f)}
            namespaces.discard(None)
            victims = {pid for pid in ns.all_pids() if ns.proc_namespaces(pid) & namespaces}
            for host_pids in state.get("pids", {}).values():
                for rec in host_pids.values():
                    if ns.alive(rec):
                        victims.add(rec[0])
            ns.terminate(victims)
            for f in ns_files:
                ns.umount(f)
            ns.umount(self.dir / "ns")
            for n in sorted(names):
                if Path("/run/netns", n).exists():
                    ns.run(["ip", "netns", "del", n])
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self._state = {}


# --- helpers ---------------------------------------------------------------------------
def unavailable_reason() -> str | None:
    """Why the lab cannot boot its test guests on this machine (for skipping tests), or None."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, mounts, libvirtd)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools for the lab: {', '.join(missing)} (run scripts/setup.sh)"
    if not guestmod.kernel_versions():
        return "no linux-image-*-cloud-amd64 kernel for the test guest (run scripts/setup.sh)"
    if not Path("/bin/busybox").is_file():
        return "busybox-static is not installed (run scripts/setup.sh)"
    return None


def _preflight(domain_type: str) -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, libvirtd)")
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise LabError(f"missing tools: {', '.join(missing)} (run scripts/setup.sh)")
    if domain_type not in ("qemu", "kvm"):
        raise LabError(f"domain type must be qemu or kvm, not {domain_type!r}")
    if domain_type == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise LabError("domain type kvm needs a usable /dev/kvm")

"""End-to-end migration in the lab: ``migsec migrate`` A -> B next to save + scp + restore.

Run as root (prints figures, asserts nothing)::

    .venv/bin/python bench/bench_migration.py [--runs 2] [--guests 256M,1G] [--quick]

A fresh lab (two libvirt hosts in namespaces, a CA, domains cloud-a / cloud-b, both migsecd,
set up by tests/e2e/deploy.py) and a private sshd inside host B. Per guest size and run, a
fresh guest boots on A with a 2 GiB qcow2 disk of which 300 MiB were written (random data,
from the host, before boot), then either

* migsec: ``migsec migrate NAME migsec://B --persistent --undefinesource`` run inside A, or
* baseline: ``virsh save`` on A, ``scp -c aes128-gcm@openssh.com`` of the save image and the
  disk from inside A to B (SFTP mode, the default, and the legacy ``-O`` protocol), ``virsh
  restore`` on B (through migsec.virt, as migsecd does). The same two files also go A -> B
  through migsec's data plane alone (``migsec.transfer`` over one TCP connection), so the pure
  transfer is compared on identical bytes.

Measured: wall time; downtime = first poll that sees the guest not running on A until the
first poll that sees it running on B (20 ms polls through libvirt on both hosts), next to
the daemon's own figure; phases from both daemons' journals; bytes the record layer put on
the TCP connection (``bytes_on_wire``) and what host A's veth counted in both directions
(Ethernet/IP/TCP headers included, GSO packets counted once); allocated bytes of what moved.
The machine is shared: the load average is printed with each run; tables give medians.
Method and results: docs/benchmarks.md. ``--logs DIR`` keeps both daemons' logs and journals.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migsec import virt  # noqa: E402
from migsec.errors import DomainNotFoundError  # noqa: E402
from migsec.lab import Lab  # noqa: E402
from tests.e2e.deploy import ADMIN, ADMIN_PASSWORD, PORT, Deployment, deploy  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
SSH_PORT = 2222
DATA_OFFSET = 64 * MiB  # the guest writes its own 4 KiB blocks at the start of the disk


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- the disk -----------------------------------------------------------------------------------
def make_disk_template(workdir: Path, size: int, written: int) -> Path:
    """A qcow2 of ``size`` with ``written`` random bytes in 4 MiB runs spread over the disk."""
    raw = workdir / "template.raw"
    fd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        runs = written // (4 * MiB)
        step = (size - DATA_OFFSET) // runs
        for i in range(runs):
            os.pwrite(fd, os.urandom(4 * MiB), DATA_OFFSET + i * step)
    finally:
        os.close(fd)
    qcow = workdir / "template.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True)
    raw.unlink()
    return qcow


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# ---- observation --------------------------------------------------------------------------------
def veth_bytes(lab: Lab) -> tuple[int, int]:
    """(tx, rx) bytes of host A's veth."""
    out = lab.host("a").exec(["cat", "/sys/class/net/lab0/statistics/tx_bytes",
                              "/sys/class/net/lab0/statistics/rx_bytes"]).stdout.split()
    return int(out[0]), int(out[1])


class StatePoller:
    """Polls the guest's state on A and B through libvirt; times the gap between them."""

    def __init__(self, lab: Lab, name: str, interval: float = 0.02) -> None:
        self.lab, self.name, self.interval = lab, name, interval
        self.stopped_on_a: float | None = None
        self.running_on_b: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _state(self, conn) -> str:
        try:
            return virt.domain_state(conn, self.name).value
        except DomainNotFoundError:
            return "absent"

    def _run(self) -> None:
        with virt.connect(self.lab.host("a").libvirt_uri) as ca, virt.connect(self.lab.host("b").libvirt_uri) as cb:
            while not self._stop.is_set():
                now = time.monotonic()
                if self.stopped_on_a is None and self._state(ca) != "running":
                    self.stopped_on_a = now
                if self.stopped_on_a is not None and self.running_on_b is None and self._state(cb) == "running":
                    self.running_on_b = time.monotonic()
                    return
                time.sleep(self.interval)

    def __enter__(self) -> StatePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def downtime(self) -> float | None:
        if self.stopped_on_a is None or self.running_on_b is None:
            return None
        return self.running_on_b - self.stopped_on_a


def journal_history(domain_base: Path, mid: str) -> dict[str, float]:
    """Phase -> unix time from a daemon's journal of migration ``mid``."""
    for path in (domain_base / "state").rglob(f"*{mid}*.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "history" in doc:
            return {p: float(t) for p, t in doc["history"]}
    return {}


# ---- sshd in host B -----------------------------------------------------------------------------
class LabSshd:
    """An sshd of our own inside host B (temporary host key, one authorized key), and scp from A."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.dir = workdir / "ssh"
        self.proc: subprocess.Popen | None = None
        self.log = None

    def start(self) -> None:
        d = self.dir
        d.mkdir(mode=0o700)
        for name in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
        shutil.copy(d / "user.pub", d / "authorized_keys")
        b = self.lab.host("b")
        (b.dir / "run" / "sshd").mkdir(mode=0o755, exist_ok=True)  # /run/sshd inside B
        (d / "sshd_config").write_text(
            f"Port {SSH_PORT}\nListenAddress {b.address}\nHostKey {d}/host\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nStrictModes no\n"
            f"PidFile {d}/sshd.pid\nUsePAM no\nPermitRootLogin yes\nSubsystem sftp internal-sftp\n")
        self.log = open(d / "sshd.log", "wb")
        self.proc = b.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stderr=self.log)
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise RuntimeError(f"sshd in host b did not start: {(d / 'sshd.log').read_text()[:300]}")

    def copy(self, files: list[Path], dest_dir: Path, *, legacy: bool = False) -> float:
        d = self.dir
        argv = ["scp", "-q", *(["-O"] if legacy else []), "-c", "aes128-gcm@openssh.com", "-i", str(d / "user"),
                "-P", str(SSH_PORT), "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={d}/known_hosts",
                "-o", "BatchMode=yes", *map(str, files), f"{self.lab.host('b').address}:{dest_dir}/"]
        t0 = time.monotonic()
        self.lab.host("a").exec(argv, timeout=900)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in _children(self.proc.pid):
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass
            self.proc.terminate()
            self.proc.wait(10)
        if self.log is not None:
            self.log.close()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# ---- the data plane alone, between the same hosts ----------------------------------------------
PLANE_PORT = 7600


def _plane_keys(key_file: str):
    from migsec.protocol import SessionKeys

    raw = bytes.fromhex(Path(key_file).read_text().strip())
    return SessionKeys("bench-plane", raw[:32], raw[32:64], raw[64:96], "cloud-a.example", "cloud-b.example")


def plane_receive(address: str, key_file: str, staging: str, disk_target: str) -> None:
    """Inside host B: receive a memory image and a disk with migsec.transfer, print figures."""
    from migsec.protocol import RecordLayer
    from migsec.transfer import Expected, receive_streams

    with socket.create_server((address, PLANE_PORT)) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
    with conn:
        cpu = time.process_time()
        result = receive_streams(conn, RecordLayer(_plane_keys(key_file), "destination"), staging,
                                 {"memory": Expected("memory", max_size=64 * GiB),
                                  "disk": Expected("disk", target=disk_target)})
        result.staging.commit()
        result.staging.close()
    print(json.dumps({"recv_cpu": time.process_time() - cpu}), flush=True)


def plane_send(address: str, key_file: str, memory: str, disk: str) -> None:
    """Inside host A: send a memory image and a disk with migsec.transfer, print figures."""
    from migsec.protocol import RecordLayer
    from migsec.transfer import StreamSource, send_streams

    t0, cpu = time.monotonic(), time.process_time()
    with socket.create_connection((address, PLANE_PORT)) as sock:
        result = send_streams(sock, RecordLayer(_plane_keys(key_file), "source"),
                              [StreamSource(1, "memory", "memory", path=memory),
                               StreamSource(2, "disk", "disk", path=disk)])
    print(json.dumps({"seconds": time.monotonic() - t0, "send_cpu": time.process_time() - cpu,
                      "wire_bytes": result.wire_bytes, "data_bytes": result.data_bytes}), flush=True)


def run_plane(lab: Lab, workdir: Path, memory: Path, disk: Path) -> dict[str, float]:
    """Time migsec.transfer alone moving ``memory`` and ``disk`` from host A to host B."""
    key_file = workdir / "plane.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, secrets.token_hex(96).encode())
    os.close(fd)
    a, b = lab.host("a"), lab.host("b")
    target = b.image_dir / f"plane-{disk.name}"
    staging = workdir / "plane-staging"
    me = str(Path(__file__).resolve())
    recv = b.popen([sys.executable, me, "--plane-recv", b.address, str(key_file), str(staging), str(target)],
                   stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None
        recv.stdout.readline()  # "listening"
        sent = a.exec([sys.executable, me, "--plane-send", b.address, str(key_file), str(memory), str(disk)],
                      timeout=900)
        out = json.loads(sent.stdout.strip().splitlines()[-1])
        out.update(json.loads(recv.stdout.readline()))
    finally:
        recv.wait(60)
        target.unlink(missing_ok=True)
    return out


# ---- one run of each kind -----------------------------------------------------------------------
@dataclass
class Run:
    kind: str
    memory: str
    load: float
    figures: dict[str, float] = field(default_factory=dict)


def boot_guest(lab: Lab, template: Path, name: str, memory: str, region_mib: int) -> Path:
    a = lab.host("a")
    disk = a.image_dir / f"{name}.qcow2"
    subprocess.run(["cp", "--sparse=always", str(template), str(disk)], check=True)
    lab.define_guest("a", name, memory=memory, disk_size="2G", region_mib=region_mib)
    lab.start_guest("a", name, timeout=600)
    time.sleep(2)  # a few counter ticks and disk blocks
    return disk


def cleanup_guest(lab: Lab, name: str) -> None:
    for h in ("a", "b"):
        host = lab.host(h)
        host.virsh("destroy", name, check=False)
        host.virsh("undefine", name, check=False)
        for f in host.image_dir.glob(f"{name}*"):
            f.unlink()


def run_migsec(lab: Lab, dep: Deployment, template: Path, memory: str, region_mib: int) -> Run:
    name = "m" + secrets.token_hex(3)
    disk = boot_guest(lab, template, name, memory, region_mib)
    run = Run("migsec", memory, os.getloadavg()[0])
    disk_alloc = allocated(disk)
    a, b = dep["a"], dep["b"]
    tx0, rx0 = veth_bytes(lab)
    t0 = time.monotonic()
    with StatePoller(lab, name) as poll:
        proc = a.migsec("migrate", name, f"migsec://{b.address}:{PORT}", "--json", "--persistent",
                        "--undefinesource", "--user", ADMIN, "--password-stdin", "--config", str(a.config),
                        input=ADMIN_PASSWORD + "\n", timeout=900)
        wall = time.monotonic() - t0
        deadline = time.monotonic() + 10
        while poll.running_on_b is None and time.monotonic() < deadline:
            time.sleep(0.05)
    tx1, rx1 = veth_bytes(lab)
    if proc.returncode != 0:
        raise RuntimeError(f"migsec migrate exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    result = json.loads(proc.stdout)
    mid = result["migration_id"]
    ja, jb = journal_history(a.base, mid), journal_history(b.base, mid)
    f = run.figures
    f.update(wall=wall, seconds=result["seconds"], downtime_daemon=result["downtime_seconds"],
             downtime_polled=poll.downtime or float("nan"), record_bytes=result["bytes_on_wire"],
             data_bytes=result["data_bytes"], logical_bytes=result["logical_bytes"],
             veth_bytes=(tx1 - tx0) + (rx1 - rx0), veth_tx=tx1 - tx0, disk_allocated=disk_alloc)
    if "suspended" in ja and "saved" in ja:
        f["save"] = ja["saved"] - ja["suspended"]
    if "suspended" in ja and "streamed" in ja:
        f["suspend_to_streamed"] = ja["streamed"] - ja["suspended"]
    if "streaming" in ja and "streamed" in ja:
        f["streaming"] = ja["streamed"] - ja["streaming"]
    if "received" in jb and "restored-paused" in jb:
        f["restore"] = jb["restored-paused"] - jb["received"]
    if "streamed" in ja and "resumed" in jb:
        f["streamed_to_resumed"] = jb["resumed"] - ja["streamed"]
    f["journal_a"] = {p: round(t - ja.get("requested", t), 3) for p, t in ja.items()}  # type: ignore[assignment]
    f["journal_b"] = {p: round(t - jb.get("accepted", t), 3) for p, t in jb.items()}  # type: ignore[assignment]
    cleanup_guest(lab, name)
    return run


def run_scp(lab: Lab, sshd: LabSshd, workdir: Path, template: Path, memory: str, region_mib: int) -> Run:
    name = "s" + secrets.token_hex(3)
    disk = boot_guest(lab, template, name, memory, region_mib)
    run = Run("scp", memory, os.getloadavg()[0])
    a, b = lab.host("a"), lab.host("b")
    save = a.image_dir / f"{name}.save"
    f = run.figures
    with virt.connect(a.libvirt_uri) as conn_a:
        uuid = virt.describe_domain(conn_a, name).uuid
        t0 = time.monotonic()
        virt.save_domain(conn_a, name, str(save))
        f["save"] = time.monotonic() - t0
    files = [save, disk]
    f["save_size"], f["save_allocated"] = save.stat().st_size, allocated(save)
    f["disk_size"], f["disk_allocated"] = disk.stat().st_size, allocated(disk)
    f["file_bytes"] = sum(p.stat().st_size for p in files)
    f["allocated"] = sum(allocated(p) for p in files)
    # what hashing the whole image costs: migsecd no longer pays it on the critical path (it hashes
    # the image while libvirt writes it, and re-hashes the final file while B restores)
    from migsec.transfer import StreamSource

    t0 = time.monotonic()
    StreamSource(1, "memory", "memory", path=save).digest()
    f["memory_prehash"] = time.monotonic() - t0
    tx0, rx0 = veth_bytes(lab)
    f["scp"] = sshd.copy(files, b.image_dir)
    tx1, rx1 = veth_bytes(lab)
    f["veth_bytes"], f["veth_tx"] = (tx1 - tx0) + (rx1 - rx0), tx1 - tx0
    t0 = time.monotonic()  # scp leaves the copy in B's page cache; migsec ACKs only what is on disk
    b.exec(["sync", *[str(b.image_dir / p.name) for p in files]])
    f["scp_fsync"] = time.monotonic() - t0
    for p in files:
        (b.image_dir / p.name).unlink()
    tx0, rx0 = veth_bytes(lab)
    plane = run_plane(lab, workdir, save, disk)
    tx1, rx1 = veth_bytes(lab)
    f["plane"], f["plane_record_bytes"], f["plane_data_bytes"] = \
        plane["seconds"], plane["wire_bytes"], plane["data_bytes"]
    f["plane_send_cpu"], f["plane_recv_cpu"] = plane["send_cpu"], plane["recv_cpu"]
    f["veth_bytes_plane"] = (tx1 - tx0) + (rx1 - rx0)
    tx0, rx0 = veth_bytes(lab)
    f["scp_legacy"] = sshd.copy(files, b.image_dir, legacy=True)  # B restores from this copy
    tx1, rx1 = veth_bytes(lab)
    f["veth_bytes_legacy"] = (tx1 - tx0) + (rx1 - rx0)
    with virt.connect(b.libvirt_uri) as conn_b:
        target = b.image_dir / save.name
        xml = virt.save_image_restore_xml(conn_b, str(target), uuid=uuid,
                                          disk_map={str(a.image_dir): str(b.image_dir)})
        t0 = time.monotonic()
        virt.restore_domain(conn_b, str(target), xml=xml, paused=False)
        f["restore"] = time.monotonic() - t0
    f["downtime"] = f["save"] + f["scp"] + f["restore"]
    cleanup_guest(lab, name)
    return run


# ---- report -------------------------------------------------------------------------------------
def med(runs: list[Run], key: str) -> float:
    vals = [r.figures[key] for r in runs if isinstance(r.figures.get(key), (int, float))]
    return statistics.median(vals) if vals else float("nan")


def span(runs: list[Run], key: str, fmt: str = "{:.2f}") -> str:
    vals = [r.figures[key] for r in runs if isinstance(r.figures.get(key), (int, float))]
    return "/".join(fmt.format(v) for v in vals)


def report(memory: str, ms: list[Run], ss: list[Run]) -> None:
    loads = "/".join(f"{r.load:.1f}" for r in ms + ss)
    log(f"\n### guest {memory}, 2 GiB qcow2 disk with 300 MiB written: medians of {len(ms)} runs "
        f"(load average at the start of each run: {loads})")
    data = med(ms, "data_bytes")
    rec = med(ms, "record_bytes")
    crit_m = med(ms, "suspend_to_streamed")
    crit_s = med(ss, "save") + med(ss, "scp")
    log("| | migsec migrate | save + scp (SFTP) + restore |")
    log("|---|---|---|")
    log(f"| total wall time | {med(ms, 'wall'):.2f} s ({span(ms, 'wall')}) | {med(ss, 'downtime'):.2f} s "
        f"({span(ss, 'downtime')}) |")
    log(f"| downtime (paused on A until running on B) | {med(ms, 'downtime_polled'):.2f} s "
        f"({span(ms, 'downtime_polled')}; daemon says {span(ms, 'downtime_daemon')}) | "
        f"{med(ss, 'downtime'):.2f} s (stopped throughout) |")
    log(f"| suspend until all data is on B | {crit_m:.2f} s ({span(ms, 'suspend_to_streamed')}), "
        f"memory streamed during the save, SHA-256 checked at B | save {med(ss, 'save'):.2f} s + "
        f"scp {med(ss, 'scp'):.2f} s = {crit_s:.2f} s, no end-to-end check |")
    log(f"| SHA-256 of the whole memory image (off the critical path: hashed while saved) | "
        f"~{med(ss, 'memory_prehash'):.2f} s (timed on the baseline's image) | |")
    log(f"| restore on B | {med(ms, 'restore'):.2f} s | {med(ss, 'restore'):.2f} s |")
    log(f"| data moved | {data / MiB:.1f} MiB data extents ({med(ms, 'logical_bytes') / MiB:.1f} MiB logical) | "
        f"{med(ss, 'allocated') / MiB:.1f} MiB allocated (file sizes {med(ss, 'file_bytes') / MiB:.1f} MiB) |")
    log(f"| bytes on the wire | {rec / MiB:.1f} MiB TCP payload ({rec / data:.4f} x data); veth "
        f"{med(ms, 'veth_bytes') / MiB:.1f} MiB ({med(ms, 'veth_bytes') / data:.4f} x) | veth "
        f"{med(ss, 'veth_bytes') / MiB:.1f} MiB ({med(ss, 'veth_bytes') / med(ss, 'allocated'):.4f} x allocated) |")
    log(f"| rate over the critical path (data / suspend-to-on-B) | {data / crit_m / 1e6:.0f} MB/s | "
        f"{med(ss, 'allocated') / crit_s / 1e6:.0f} MB/s |")
    log(f"\nthe same save image + disk moved A -> B ({med(ss, 'allocated') / MiB:.1f} MiB allocated):")
    log("| | time | rate (allocated / time) | wire: veth bytes / allocated | CPU (send + receive) |")
    log("|---|---|---|---|---|")
    alloc = med(ss, "allocated")
    log(f"| migsec.transfer (AES-256-GCM, SHA-256 both sides) | {med(ss, 'plane'):.2f} s ({span(ss, 'plane')}) | "
        f"{alloc / med(ss, 'plane') / 1e6:.0f} MB/s | {med(ss, 'veth_bytes_plane') / alloc:.4f} "
        f"(TCP payload {med(ss, 'plane_record_bytes') / alloc:.4f}) | "
        f"{med(ss, 'plane_send_cpu'):.2f} + {med(ss, 'plane_recv_cpu'):.2f} s |")
    log(f"| scp -c aes128-gcm (SFTP) | {med(ss, 'scp'):.2f} s ({span(ss, 'scp')}); then fsync on B "
        f"{med(ss, 'scp_fsync'):.2f} s | {alloc / med(ss, 'scp') / 1e6:.0f} MB/s | "
        f"{med(ss, 'veth_bytes') / alloc:.4f} | |")
    log(f"| scp -O -c aes128-gcm (legacy) | {med(ss, 'scp_legacy'):.2f} s ({span(ss, 'scp_legacy')}) | "
        f"{alloc / med(ss, 'scp_legacy') / 1e6:.0f} MB/s | {med(ss, 'veth_bytes_legacy') / alloc:.4f} | |")
    log(f"speed-up over scp SFTP: data plane {med(ss, 'scp') / med(ss, 'plane'):.2f}x; "
        f"critical path (save + scp vs suspend-to-on-B) {crit_s / crit_m:.2f}x; "
        f"downtime {med(ss, 'downtime') / med(ms, 'downtime_polled'):.2f}x")
    for r in ms:
        log(f"  migsec journal A (s since requested): {r.figures.get('journal_a')}")
        log(f"  migsec journal B (s since accepted):  {r.figures.get('journal_b')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="runs per case and method (default 2)")
    parser.add_argument("--guests", default="256M,1G", help="guest memory sizes (default 256M,1G)")
    parser.add_argument("--quick", action="store_true", help="a 512 MiB disk with 64 MiB written (debugging)")
    parser.add_argument("--dir", default=None, help="parent of the work directory (default: temp dir)")
    parser.add_argument("--no-scp", action="store_true")
    parser.add_argument("--cold", action="store_true",
                        help="do not probe QEMU's capabilities before measuring (a fresh host's first migration)")
    parser.add_argument("--logs", default=None, help="copy both migsecd logs and journals here before teardown")
    parser.add_argument("--plane-recv", nargs=4, metavar=("ADDR", "KEYFILE", "STAGING", "TARGET"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--plane-send", nargs=4, metavar=("ADDR", "KEYFILE", "MEMORY", "DISK"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plane_recv:
        return plane_receive(*args.plane_recv)
    if args.plane_send:
        return plane_send(*args.plane_send)
    if os.geteuid() != 0:
        sys.exit("bench_migration.py needs root (the lab uses namespaces, mounts and libvirtd)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-migration-", dir=args.dir))
    lab = Lab(workdir / "lab", "bm" + secrets.token_hex(2))
    dep: Deployment | None = None
    sshd: LabSshd | None = None
    log(f"{os.cpu_count()} CPUs ({_cpu_model()}), load average {os.getloadavg()[0]:.1f}, lab in {workdir}")
    try:
        t0 = time.monotonic()
        lab.up(2, guest=None, timeout=300)
        dep = deploy(lab)
        dep.start()
        log(f"lab up + deploy + both migsecd: {time.monotonic() - t0:.1f} s")
        # libvirtd probes QEMU's capabilities on its first domain (seconds): pay that before measuring
        # (--cold leaves that to migsecd, which warms them in the background at start)
        for h in ("a", "b") if not args.cold else ():
            lab.host(h).virsh("domcapabilities", timeout=300)
        if not args.no_scp:
            sshd = LabSshd(lab, workdir)
            sshd.start()
        disk_size, written = (512 * MiB, 64 * MiB) if args.quick else (2 * GiB, 300 * MiB)
        template = make_disk_template(workdir, disk_size, written)
        log(f"disk template: {disk_size / MiB:.0f} MiB virtual, {written / MiB:.0f} MiB written, "
            f"qcow2 file {template.stat().st_size / MiB:.1f} MiB, allocated {allocated(template) / MiB:.1f} MiB")
        for memory in args.guests.split(","):
            mem_mib = int(memory[:-1]) * (1024 if memory.upper().endswith("G") else 1)
            region = max(16, mem_mib // 4)  # a quarter of the guest's memory holds known data
            ms: list[Run] = []
            ss: list[Run] = []
            for i in range(args.runs):
                r = run_migsec(lab, dep, template, memory, region)
                ms.append(r)
                log(f"[{memory} run {i + 1}] migsec (load {r.load:.1f}): "
                    + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in r.figures.items() if not k.startswith("journal")))
                if sshd is not None:
                    s = run_scp(lab, sshd, workdir, template, memory, region)
                    ss.append(s)
                    log(f"[{memory} run {i + 1}] scp (load {s.load:.1f}): "
                        + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in s.figures.items()))
            report(memory, ms, ss or [Run("scp", memory, 0.0)])
    finally:
        if sshd is not None:
            sshd.stop()
        if dep is not None:
            dep.stop()
            if args.logs:
                for h in ("a", "b"):
                    out = Path(args.logs) / h
                    out.mkdir(parents=True, exist_ok=True)
                    shutil.copy(dep[h].log, out / "migsecd.log")
                    shutil.copytree(dep[h].base / "state", out / "state", dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("staging"))
        lab.down()
        shutil.rmtree(workdir, ignore_errors=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()

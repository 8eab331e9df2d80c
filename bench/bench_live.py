"""Live migration in the lab: ``migsec migrate --live`` next to libvirt's own live migration.

Run as root (prints figures, asserts nothing)::

    .venv/bin/python bench/bench_live.py [--runs 3] [--cases 256M,1G,256M+dirty] [--quick]
    .venv/bin/python bench/bench_live.py --timeline --runs 1 --cases 256M --no-loopback

``--runs N`` repeats every case and method N times, the methods interleaved within each
repeat (so a burst of load from other users hits all three alike); the table gives the
median and [min-max] of each figure and the load average (1 min) seen at the start of the
runs. Each run boots a fresh guest (15-20 s per run in all): the default 3 runs take about
8 min, ``--runs 5`` about 13 min, plus a minute for the loopback figures and the lab. ``--timeline`` turns on libvirtd's debug log for
its migration and QEMU-monitor code on both hosts and prints, after each run, one merged
timeline of the switchover: QEMU's events and commands on A and B, libvirt's migration
phases, and (migsec) both bridges' channel ends, control messages and B's RPC proxy.
Both lab hosts share one clock, so the times compare directly.

Migration parameters are libvirt's and QEMU's defaults for every method (max downtime
300 ms, no bandwidth limit: migsec's lab policy allows 1000 MiB/s, above what any run
reaches), so the methods are compared under the same switchover rule.

One fresh lab (tests/e2e/deploy.py: CA, cloud-a / cloud-b, both migsecd). Per case, method
and run a fresh guest boots on A with a 2 GiB qcow2 disk of which 300 MiB were written
(random data, before boot); ``+dirty`` guests rewrite 24 MiB of their memory every 0.1 s
(``migsec.dirty``), so pre-copy must send pages again. Methods, all live, non-shared disk
(NBD mirror), persistent on B, undefined at A, between the same two lab hosts:

* migsec: ``migsec migrate NAME migsec://B --live --persistent --undefinesource`` inside A
  (libvirt p2p through migsec's session: AES-256-GCM records, SHA-256 of every channel);
* native plain: ``virsh migrate --live --copy-storage-all`` driven from outside, QEMU's
  stream and the NBD mirror over plain TCP on the lab link (no encryption);
* native --tls: the same with ``--tls`` (QEMU's own TLS, ECDSA P-256 certificates made
  here with openssl, in each host's ``/etc/libvirt/pki/qemu``).

Figures: downtime, memory bandwidth and job time from ``domjobinfo --completed`` on B;
wall time of the command; bytes host A's veth counted both ways (headers included); for
migsec also its own ``bytes_on_wire`` and the channels' bytes. A loopback measurement of
the channel bridge alone (unix -> record layer -> TCP -> record layer -> unix) shows
whether migsec's data path could be the bottleneck.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_migration import allocated, cleanup_guest, make_disk_template, veth_bytes  # noqa: E402

from migsec.lab import Lab  # noqa: E402
from tests.e2e.deploy import ADMIN, ADMIN_PASSWORD, PORT, deploy  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
DIRTY_MIB = 24


def log(msg: str) -> None:
    print(msg, flush=True)


def load() -> str:
    return "load %.1f" % os.getloadavg()[0]


def load1() -> float:
    return os.getloadavg()[0]


# ---- QEMU TLS material (openssl CLI; the lab hosts read it from /etc/libvirt/pki/qemu) --------
def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_tls(lab: Lab, work: Path) -> None:
    d = work / "tls"
    d.mkdir()
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca-key.pem", cwd=d)
    openssl("req", "-x509", "-new", "-key", "ca-key.pem", "-subj", "/CN=bench live CA", "-days", "2",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", "ca-cert.pem", cwd=d)
    for h in ("a", "b"):
        host = lab.host(h)
        out = host.dir / "etc" / "pki" / "qemu"
        out.mkdir(parents=True, exist_ok=True)
        for role, eku in (("server", "serverAuth"), ("client", "clientAuth")):
            key, csr, crt = f"{h}-{role}-key.pem", f"{h}-{role}.csr", f"{h}-{role}-cert.pem"
            openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key, cwd=d)
            openssl("req", "-new", "-key", key, "-subj", f"/CN={host.address}", "-out", csr, cwd=d)
            ext = d / f"{h}-{role}.ext"
            ext.write_text(f"subjectAltName=IP:{host.address}\nbasicConstraints=critical,CA:FALSE\n"
                           f"keyUsage=critical,digitalSignature,keyAgreement\nextendedKeyUsage={eku}\n")
            openssl("x509", "-req", "-in", csr, "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                    "-days", "2", "-extfile", ext.name, "-out", crt, cwd=d)
            (out / f"{role}-cert.pem").write_bytes((d / crt).read_bytes())
            (out / f"{role}-key.pem").write_bytes((d / key).read_bytes())
            os.chmod(out / f"{role}-key.pem", 0o600)
        (out / "ca-cert.pem").write_bytes((d / "ca-cert.pem").read_bytes())


# ---- one run --------------------------------------------------------------------------------
def boot(lab: Lab, template: Path, name: str, memory: str, dirty: int) -> Path:
    a = lab.host("a")
    disk = a.image_dir / f"{name}.qcow2"
    subprocess.run(["cp", "--sparse=always", str(template), str(disk)], check=True)
    lab.define_guest("a", name, memory=memory, disk_size="2G", region_mib=64, dirty_mib=dirty)
    lab.start_guest("a", name, timeout=900)
    time.sleep(3)
    return disk


def jobinfo(lab: Lab, name: str) -> dict:
    """``domjobinfo --completed`` on B, as numbers (ms, bytes/s, bytes)."""
    out = lab.host("b").virsh("domjobinfo", name, "--completed", "--keep-completed", check=False)
    info: dict = {}
    for line in out.splitlines():
        if ":" not in line:
            continue
        key, value = (s.strip() for s in line.split(":", 1))
        parts = value.split()
        if not parts:
            continue
        try:
            number = float(parts[0])
        except ValueError:
            continue
        unit = parts[1] if len(parts) > 1 else ""
        scale = {"KiB": 1024, "MiB": MiB, "GiB": GiB, "KiB/s": 1024, "MiB/s": MiB, "GiB/s": GiB}.get(unit, 1)
        info[key] = number * scale
    return {"downtime_ms": info.get("Total downtime"), "job_ms": info.get("Time elapsed"),
            "memory_bps": info.get("Memory bandwidth"), "memory_bytes": info.get("Memory processed"),
            "disk_bytes": info.get("File processed")}


def run_migsec(lab: Lab, dep, name: str) -> dict:
    a, b = dep["a"], dep["b"]
    before = veth_bytes(lab)
    t0 = time.monotonic()
    proc = a.migsec("migrate", name, f"migsec://{b.address}:{PORT}", "--live", "--persistent", "--undefinesource",
                    "--json", "--user", ADMIN, "--password-stdin", "--config", str(a.config),
                    input=ADMIN_PASSWORD + "\n", timeout=1800)
    wall = time.monotonic() - t0
    after = veth_bytes(lab)
    result = json.loads(proc.stdout) if proc.stdout.strip() else {}
    if proc.returncode != 0:
        raise RuntimeError(f"migsec migrate --live failed: {proc.stdout} {proc.stderr}")
    job = result.get("job", {})
    libvirt_ms = result.get("libvirt_downtime_ms", job.get("downtime_ms"))
    # since the paused commit (VIR_MIGRATE_PAUSED, B resumes after A's signed decision) the
    # guest's pause is longer than libvirt's figure: the result then carries both
    pause_ms = result["downtime_seconds"] * 1000 if "libvirt_downtime_ms" in result else None
    return {"wall_s": wall, "downtime_ms": libvirt_ms, "pause_ms": pause_ms,
            "paused_wait_ms": result.get("paused_wait_ms"), "job_ms": job.get("time_elapsed_ms"),
            "memory_bps": job.get("memory_bps"), "memory_bytes": job.get("memory_processed"),
            "veth_bytes": sum(after) - sum(before), "record_bytes": result.get("bytes_on_wire"),
            "channels": result.get("channels", {})}


def run_native(lab: Lab, name: str, work: Path, *, tls: bool) -> dict:
    a, b = lab.host("a"), lab.host("b")
    # the lab's image dirs are visible from both hosts: B must write its own file, never A's
    src = a.image_dir / f"{name}.qcow2"
    dst = b.image_dir / f"{name}.qcow2"
    size = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(src)], capture_output=True,
                                     text=True, check=True).stdout)["virtual-size"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst), str(size)], check=True)
    xml = a.virsh("dumpxml", "--migratable", name).replace(str(src), str(dst))
    xml_path = work / f"{name}-dest.xml"
    xml_path.write_text(xml)
    argv = ["virsh", "-c", a.libvirt_uri, "migrate", "--live", "--persistent", "--undefinesource",
            "--copy-storage-all", "--xml", str(xml_path), "--persistent-xml", str(xml_path)]
    if tls:
        argv.append("--tls")
    argv += [name, b.libvirt_uri, f"tcp://{b.address}"]
    before = veth_bytes(lab)
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    wall = time.monotonic() - t0
    after = veth_bytes(lab)
    if proc.returncode != 0:
        raise RuntimeError(f"virsh migrate{' --tls' if tls else ''} failed: {proc.stderr.strip()}")
    src.unlink(missing_ok=True)
    return {"wall_s": wall, **jobinfo(lab, name), "veth_bytes": sum(after) - sum(before)}


# ---- the bridge alone, on loopback ---------------------------------------------------------------
def _bridge_pair(tmp: Path, target) -> tuple:
    """Two ChannelBridges over a loopback TCP pair with real session keys; B's targets are
    unix connections to ``target(kind)`` (a path)."""
    from datetime import datetime, timedelta, timezone

    from migsec.crypto import random_bytes
    from migsec.migration.bridge import ChannelBridge
    from migsec.pki import CertificateAuthority, DomainIdentity, TrustStore
    from migsec.protocol import (AuthorizationTicket, DestinationHandshake, MigrationRequest, RecordLayer,
                                 ReplayCache, SourceHandshake)

    ca = CertificateAuthority.create(tmp / "ca", "bench CA")
    ids = {}
    for did in ("cloud-a.example", "cloud-b.example"):
        ca.issue_domain(did, tmp / did)
        ids[did] = DomainIdentity.load(tmp / did / "domain-key.pem", tmp / did / "domain-cert.pem")
    trust = TrustStore.from_files([tmp / "ca" / "ca-cert.pem"])
    now = datetime.now(timezone.utc)
    req = MigrationRequest(vm="vm1", mode="live", dest_did="cloud-b.example")
    tkt = AuthorizationTicket(src_did="cloud-a.example", dest_did="cloud-b.example", user_id="u", vm="vm1",
                              request_digest=req.digest(), nonce4=random_bytes(16), issued_at=now,
                              expires_at=now + timedelta(minutes=5)).sign(ids["cloud-a.example"].key)
    src = SourceHandshake(ids["cloud-a.example"], trust, peer_did="cloud-b.example",
                          peer_cert_pem=ids["cloud-b.example"].cert_pem)
    dst = DestinationHandshake(ids["cloud-b.example"], trust, replay_cache=ReplayCache())
    dst.receive_data(src.initiate(req, tkt))
    dst.next_event()
    src.receive_data(dst.accept())
    keys = src.next_event().keys
    server = socket.create_server(("127.0.0.1", 0))
    ta = socket.create_connection(server.getsockname())
    tb, _ = server.accept()
    server.close()

    def connect(kind: str, ch: int):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(target(kind))
        return s, None

    a = ChannelBridge(ta, RecordLayer(keys, "source"), role="source", peer_name="B")
    b = ChannelBridge(tb, RecordLayer(keys, "destination"), role="destination", peer_name="A", connect_target=connect)
    return a, b


def bridge_loopback(total: int = 1 * GiB, write_size: int = 4 * MiB) -> dict:
    """unix -> ChannelBridge(A) -> TCP -> ChannelBridge(B) -> unix, one channel, ``total`` bytes
    written ``write_size`` at a time (QEMU's migration stream arrives in ~200 KiB reads)."""
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sink.bind(str(tmp / "sink"))
    sink.listen(1)
    got = [0]

    def drain() -> None:
        c, _ = sink.accept()
        buf = bytearray(1 << 20)
        while n := c.recv_into(buf):
            got[0] += n
        c.close()

    threading.Thread(target=drain, daemon=True).start()
    a, b = _bridge_pair(tmp, lambda kind: str(tmp / "sink"))
    a.listen("qemu", str(tmp / "qemu.sock"))
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(tmp / "qemu.sock"))
    block = memoryview(os.urandom(4 * MiB))
    cpu0, t0 = time.process_time(), time.monotonic()
    sent = 0
    while sent < total:
        c.sendall(block[:write_size])
        sent += write_size
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    b.wait_channels_done(600)
    wall = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    a.close(clean=True)
    b.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"bytes": got[0], "wall_s": wall, "mib_s": got[0] / wall / MiB, "cpu_s": cpu}


def bridge_round_trips(n: int = 1000, request: int = 64 * 1024, reply: int = 16, *, depth: int = 1,
                       nagle_at_b: bool = False) -> dict:
    """``depth`` requests sent back to back, then their ``depth`` replies awaited, through both
    bridges (NBD writes in flight and their 16-byte replies, an RPC call and its answer): the
    latency small messages add at the switchover. ``nagle_at_b`` turns TCP_NODELAY off again on
    B's session socket (what an accepted socket has by default)."""
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="br-", dir="/tmp"))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp / "nbd"))
    server.listen(1)

    def answer() -> None:
        c, _ = server.accept()
        buf = bytearray(request)
        view = memoryview(buf)
        while True:
            pos = 0
            while pos < request:
                got = c.recv_into(view[pos:])
                if not got:
                    c.close()
                    return
                pos += got
            c.sendall(b"r" * reply)

    threading.Thread(target=answer, daemon=True).start()
    a, b = _bridge_pair(tmp, lambda kind: str(tmp / "nbd"))
    if nagle_at_b:
        b.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    a.listen("nbd", str(tmp / "nbd.sock"))
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(tmp / "nbd.sock"))
    payload = os.urandom(request) * depth
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.sendall(payload)
        left = reply * depth
        while left:
            left -= len(c.recv(left))
        times.append(time.perf_counter() - t0)
    c.close()
    b.wait_channels_done(60)
    a.close(clean=True)
    b.close()
    shutil.rmtree(tmp, ignore_errors=True)
    times.sort()
    return {"median_ms": 1000 * statistics.median(times), "p99_ms": 1000 * times[int(0.99 * len(times))],
            "max_ms": 1000 * times[-1]}


# ---- report -------------------------------------------------------------------------------------
def fmt(value, scale: float = 1, spec: str = "{:.0f}") -> str:
    return "-" if value is None else spec.format(value / scale)


def spread(runs: list[dict], key: str, scale: float = 1, spec: str = "{:.0f}") -> str:
    """median [min-max] of ``key`` over the runs that have it."""
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return "-"
    med = fmt(statistics.median(values), scale, spec)
    if len(values) == 1:
        return med
    return f"{med} [{fmt(min(values), scale, spec)}-{fmt(max(values), scale, spec)}]"


COLUMNS = (("downtime ms", "downtime_ms", 1, "{:.0f}"), ("pause ms", "pause_ms", 1, "{:.0f}"),
           ("job s", "job_ms", 1000, "{:.2f}"), ("wall s", "wall_s", 1, "{:.2f}"),
           ("mem MiB/s", "memory_bps", MiB, "{:.0f}"), ("memory MB", "memory_bytes", 1e6, "{:.0f}"),
           ("wire MB", "veth_bytes", 1e6, "{:.0f}"), ("wire/data", "wire_ratio", 1, "{:.3f}"),
           ("load", "load", 1, "{:.1f}"))


def report(case: str, rows: dict[str, list[dict]]) -> None:
    """The case's table: median [min-max] per figure and method ("pause ms": the guest's whole
    pause when migsec reports one beyond libvirt's downtime)."""
    n = max((len(v) for v in rows.values()), default=0)
    log(f"\n== {case}: median [min-max] over {n} run(s) ==")
    cells = [["method", *(c[0] for c in COLUMNS)]]
    for method, runs in rows.items():
        for r in runs:
            data = (r.get("memory_bytes") or 0) + r.get("disk_alloc", 0)
            r["wire_ratio"] = r["veth_bytes"] / data if r.get("veth_bytes") and data else None
        cells.append([method + ("" if runs else " (failed)"),
                      *(spread(runs, key, scale, spec) for _, key, scale, spec in COLUMNS)])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        log("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


# ---- the switchover timeline (--timeline) ---------------------------------------------------------
LIBVIRT_DEBUG_LOG = "/var/log/libvirt/libvirtd-debug.log"  # inside each lab host
# what of libvirtd's debug output makes the timeline: QEMU's events and the commands that matter
# at the switchover, and libvirt's migration phases
TIMELINE_PATTERNS = (
    re.compile(r'QEMU_MONITOR_RECV_EVENT.*"event": ?"(MIGRATION|STOP|RESUME|BLOCK_JOB_COMPLETED|BLOCK_JOB_READY|'
               r'MIGRATION_PASS|BLOCK_JOB_CANCELLED|JOB_STATUS_CHANGE)"(.*)'),
    re.compile(r'QEMU_MONITOR_SEND_MSG.*"execute": ?"(cont|stop|migrate|migrate-incoming|block-job-cancel|'
               r'blockdev-mirror|nbd-server-start|nbd-server-stop|nbd-server-add|block-export-add|'
               r'migrate-set-parameters|query-migrate)"'),
    re.compile(r'(qemuMigration\w*(?:Begin|Prepare|Perform|Finish|Confirm|WaitForCompletion|NBDCopyCancel|'
               r'Run|Phase)\w*)[:(]'),
)
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\+0000: ")
TIMELINE_LINE = re.compile(r"timeline \((source|destination)\) of the session with [^:]+: (.*)$")


def enable_libvirt_debug(lab: Lab) -> None:
    for h in ("a", "b"):
        host = lab.host(h)
        host.exec(["virt-admin", "daemon-log-filters", "1:qemu.qemu_monitor 1:qemu.qemu_migration"])
        host.exec(["virt-admin", "daemon-log-outputs", f"1:file:{LIBVIRT_DEBUG_LOG} 3:file:/var/log/libvirt/libvirtd.log"])


def _epoch(text: str) -> float:
    from datetime import datetime, timezone

    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


def libvirt_events(lab: Lab, t0: float, t1: float) -> list[tuple[float, str]]:
    events: list[tuple[float, str]] = []
    for h in ("a", "b"):
        path = lab.host(h).outside(LIBVIRT_DEBUG_LOG)
        if not path.exists():
            continue
        last_phase = ""
        for line in path.read_text(errors="replace").splitlines():
            m = STAMP.match(line)
            if not m:
                continue
            t = _epoch(m.group(1))
            if not t0 <= t <= t1:
                continue
            for pattern in TIMELINE_PATTERNS:
                hit = pattern.search(line)
                if hit is None:
                    continue
                what = hit.group(1)
                if pattern is TIMELINE_PATTERNS[0]:
                    status = re.search(r'"status": ?"([\w-]+)"', hit.group(2) or "")
                    what = f"QEMU event {what}" + (f" {status.group(1)}" if status else "")
                elif pattern is TIMELINE_PATTERNS[1]:
                    if what == "query-migrate":
                        break
                    what = f"QEMU cmd {what}"
                else:
                    if what == last_phase:
                        break
                    last_phase = what
                events.append((t, f"{h.upper()} libvirt: {what}"))
                break
    return events


def bridge_events(dep, t0: float, t1: float) -> list[tuple[float, str]]:
    """Both migsecd's session timelines (their log lines) that fall in [t0, t1]."""
    from datetime import datetime, timezone

    events: list[tuple[float, str]] = []
    day = datetime.fromtimestamp(t0, timezone.utc).strftime("%Y-%m-%d")
    for h in ("a", "b"):
        for line in dep[h].log.read_text(errors="replace").splitlines():
            m = TIMELINE_LINE.search(line)
            if not m:
                continue
            for item in m.group(2).split("; "):
                stamp, _, what = item.partition(" ")
                t = _epoch(f"{day} {stamp}")
                if t0 <= t <= t1:
                    events.append((t, f"{h.upper()} migsecd: {what}"))
    return events


def print_timeline(title: str, events: list[tuple[float, str]]) -> None:
    events.sort()
    if not events:
        log(f"  timeline of {title}: nothing logged")
        return
    stops = [t for t, what in events if what.startswith("A libvirt: QEMU event STOP")]
    zero = stops[0] if stops else events[0][0]
    log(f"  timeline of {title} (ms from {'the STOP on A' if stops else 'the first event'}):")
    for t, what in events:
        log(f"    {1000 * (t - zero):9.1f}  {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="repeats of every case and method (default 3)")
    parser.add_argument("--timeline", action="store_true",
                        help="libvirtd debug log on both hosts and a merged switchover timeline per run")
    parser.add_argument("--json-out", type=Path, help="write every run's figures here")
    parser.add_argument("--cases", default="256M,1G,256M+dirty")
    parser.add_argument("--methods", default="migsec,native-plain,native-tls")
    parser.add_argument("--quick", action="store_true", help="a 512 MiB disk with 64 MiB written")
    parser.add_argument("--no-loopback", action="store_true")
    parser.add_argument("--loopback-only", action="store_true", help="only the bridge on loopback (no lab)")
    args = parser.parse_args()
    if not args.no_loopback:
        import logging

        logging.getLogger("migsecd.bridge").setLevel(logging.ERROR)  # each pair's close is abrupt
        for size in (4 * MiB, 208 * 1024):
            lb = bridge_loopback(write_size=size)
            log(f"bridge loopback, {size // 1024} KiB writes: {lb['bytes'] / MiB:.0f} MiB in {lb['wall_s']:.2f} s = "
                f"{lb['mib_s']:.0f} MiB/s (both bridges in this process: {lb['cpu_s']:.2f} s CPU, {load()})")
        for depth in (1, 8):
            for nagle in (False, True):
                rt = bridge_round_trips(depth=depth, nagle_at_b=nagle)
                log(f"bridge round trips, {depth} x (64 KiB request, 16-byte reply) in flight"
                    f"{', Nagle on at B' if nagle else ''}: median {rt['median_ms']:.2f} ms, p99 {rt['p99_ms']:.2f} ms, "
                    f"max {rt['max_ms']:.1f} ms ({load()})")
        if args.loopback_only:
            return
    work = Path(tempfile.mkdtemp(prefix="bench-live-"))
    lab = Lab(work / "lab", "bl" + secrets.token_hex(2))
    dep = None
    try:
        lab.up(2, guest=None, timeout=180)
        dep = deploy(lab)
        dep.start()
        make_tls(lab, work)
        size, written = (512 * MiB, 64 * MiB) if args.quick else (2 * GiB, 300 * MiB)
        template = make_disk_template(work, size, written)
        disk_alloc = allocated(template)
        log(f"disk template: {size // MiB} MiB virtual, {disk_alloc / MiB:.0f} MiB allocated")
        if args.timeline:
            enable_libvirt_debug(lab)
        cases = args.cases.split(",")
        log(f"{args.runs} run(s) x {len(cases)} case(s) x {len(args.methods.split(','))} method(s); "
            f"started {time.strftime('%H:%M:%S', time.gmtime())} UTC, {load()}")
        everything: dict[str, dict[str, list[dict]]] = {}
        bench_t0 = time.monotonic()
        for case in cases:
            memory, _, extra = case.partition("+")
            dirty = DIRTY_MIB if extra == "dirty" else 0
            rows: dict[str, list[dict]] = {m: [] for m in args.methods.split(",")}
            for run in range(args.runs):
                for method in rows:
                    name = f"lv{secrets.token_hex(2)}"
                    try:
                        boot(lab, template, name, memory, dirty)
                        start_load, t0 = load1(), time.time()
                        if method == "migsec":
                            r = run_migsec(lab, dep, name)
                        else:
                            r = run_native(lab, name, work, tls=method == "native-tls")
                        t1 = time.time()
                        r.update(disk_alloc=disk_alloc, load=start_load, load_after=load1())
                        rows[method].append(r)
                        log(f"{case} {method} run {run + 1}: downtime {fmt(r.get('downtime_ms'))} ms"
                            + (f" (pause {fmt(r['pause_ms'])} ms, of it waiting for A's decision "
                               f"{fmt(r.get('paused_wait_ms'))} ms)" if r.get("pause_ms") is not None else "")
                            + f", {fmt(r.get('memory_bps'), MiB)} MiB/s, job {fmt(r.get('job_ms'), 1000, '{:.2f}')} s, "
                            f"wall {r['wall_s']:.2f} s, wire {fmt(r.get('veth_bytes'), 1e6)} MB "
                            f"(load {start_load:.1f} -> {r['load_after']:.1f})"
                            + (f", channels {r['channels']}" if r.get("channels") else ""))
                        if args.timeline:
                            time.sleep(1)  # the daemons log their timelines when the sessions close
                            events = libvirt_events(lab, t0, t1 + 1)
                            if method == "migsec":
                                events += bridge_events(dep, t0, t1 + 1)
                            print_timeline(f"{case} {method} run {run + 1}", events)
                    except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
                        log(f"{case} {method} run {run + 1}: FAILED: {exc}")
                    finally:
                        cleanup_guest(lab, name)
            report(case, rows)
            everything[case] = rows
        log(f"\nall runs took {(time.monotonic() - bench_t0) / 60:.1f} min; finished {load()}")
        if args.json_out:
            args.json_out.write_text(json.dumps(everything, indent=1, default=str))
    finally:
        if dep is not None:
            dep.stop()
        lab.down()
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # the disk template and the TLS material


if __name__ == "__main__":
    main()

"""Live migration in the lab: ``migsec migrate --live`` next to libvirt's own live migration.

Run as root (prints figures, asserts nothing)::

    .venv/bin/python bench/bench_live.py [--runs 1] [--cases 256M,1G,256M+dirty] [--quick]

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
    return {"wall_s": wall, "downtime_ms": job.get("downtime_ms"), "job_ms": job.get("time_elapsed_ms"),
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
def bridge_loopback(total: int = 1 * GiB) -> dict:
    """unix -> ChannelBridge(A) -> TCP -> ChannelBridge(B) -> unix, one channel, ``total`` bytes."""
    from datetime import datetime, timedelta, timezone

    from migsec.crypto import random_bytes
    from migsec.migration.bridge import ChannelBridge
    from migsec.pki import CertificateAuthority, DomainIdentity, TrustStore
    from migsec.protocol import (AuthorizationTicket, DestinationHandshake, MigrationRequest, RecordLayer,
                                 ReplayCache, SourceHandshake)

    tmp = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
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

    def target(kind: str, ch: int):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(tmp / "sink"))
        return s, None

    a = ChannelBridge(ta, RecordLayer(keys, "source"), role="source", peer_name="B")
    b = ChannelBridge(tb, RecordLayer(keys, "destination"), role="destination", peer_name="A", connect_target=target)
    a.listen("qemu", str(tmp / "qemu.sock"))
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(tmp / "qemu.sock"))
    block = os.urandom(4 * MiB)
    cpu0, t0 = time.process_time(), time.monotonic()
    sent = 0
    while sent < total:
        c.sendall(block)
        sent += len(block)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    b.wait_channels_done(600)
    wall = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    a.close()
    b.close()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return {"bytes": got[0], "wall_s": wall, "mib_s": got[0] / wall / MiB, "cpu_s": cpu}


# ---- report -------------------------------------------------------------------------------------
def fmt(value, scale: float = 1, spec: str = "{:.0f}") -> str:
    return "-" if value is None else spec.format(value / scale)


def report(case: str, rows: dict[str, list[dict]]) -> None:
    log(f"\n== {case}: medians over {max(len(v) for v in rows.values())} run(s) ==")
    log(f"{'method':<14} {'downtime ms':>11} {'job s':>7} {'wall s':>7} {'mem MiB/s':>9} "
        f"{'memory MB':>9} {'wire MB':>8} {'wire/data':>9}")
    for method, runs in rows.items():
        if not runs:
            log(f"{method:<14} (failed)")
            continue

        def med(key: str):
            values = [r[key] for r in runs if r.get(key) is not None]
            return statistics.median(values) if values else None

        data = (med("memory_bytes") or 0) + runs[0].get("disk_alloc", 0)
        wire = med("veth_bytes")
        log(f"{method:<14} {fmt(med('downtime_ms')):>11} {fmt(med('job_ms'), 1000, '{:.2f}'):>7} "
            f"{fmt(med('wall_s'), 1, '{:.2f}'):>7} {fmt(med('memory_bps'), MiB):>9} "
            f"{fmt(med('memory_bytes'), 1e6):>9} {fmt(wire, 1e6):>8} "
            f"{(wire / data if wire and data else 0):>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--cases", default="256M,1G,256M+dirty")
    parser.add_argument("--methods", default="migsec,native-plain,native-tls")
    parser.add_argument("--quick", action="store_true", help="a 512 MiB disk with 64 MiB written")
    parser.add_argument("--no-loopback", action="store_true")
    args = parser.parse_args()
    if not args.no_loopback:
        lb = bridge_loopback()
        log(f"bridge loopback: {lb['bytes'] / MiB:.0f} MiB in {lb['wall_s']:.2f} s = {lb['mib_s']:.0f} MiB/s "
            f"(both bridges in this process: {lb['cpu_s']:.2f} s CPU, {load()})")
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
        for case in args.cases.split(","):
            memory, _, extra = case.partition("+")
            dirty = DIRTY_MIB if extra == "dirty" else 0
            rows: dict[str, list[dict]] = {m: [] for m in args.methods.split(",")}
            for run in range(args.runs):
                for method in rows:
                    name = f"lv{secrets.token_hex(2)}"
                    try:
                        boot(lab, template, name, memory, dirty)
                        if method == "migsec":
                            r = run_migsec(lab, dep, name)
                        else:
                            r = run_native(lab, name, work, tls=method == "native-tls")
                        r["disk_alloc"] = disk_alloc
                        rows[method].append(r)
                        log(f"{case} {method} run {run + 1}: downtime {fmt(r.get('downtime_ms'))} ms, "
                            f"{fmt(r.get('memory_bps'), MiB)} MiB/s, wall {r['wall_s']:.2f} s, "
                            f"wire {fmt(r.get('veth_bytes'), 1e6)} MB ({load()})"
                            + (f", channels {r['channels']}" if r.get("channels") else ""))
                    except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
                        log(f"{case} {method} run {run + 1}: FAILED: {exc}")
                    finally:
                        cleanup_guest(lab, name)
            report(case, rows)
    finally:
        if dep is not None:
            dep.stop()
        lab.down()
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # the disk template and the TLS material


if __name__ == "__main__":
    main()

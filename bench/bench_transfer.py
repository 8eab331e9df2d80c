"""Transfer throughput over loopback TCP between two processes (prints figures, asserts nothing).

Cases: a 1 GiB random file, and a 2 GiB sparse disk with 300 MiB written; bytes on the
wire versus allocated bytes; next to scp (OpenSSH, aes128-gcm) against a private sshd
started on a high port for this run, when sshd is available.

    .venv/bin/python bench/bench_transfer.py [--dir DIR] [--quick]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
import time

from migsec.crypto import random_bytes
from migsec.protocol import RecordLayer, SessionKeys
from migsec.transfer import Expected, StreamSource, receive_streams, send_streams

MiB = 1024 * 1024


def make_random(path: str, size: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(size // (64 * MiB)):
            fh.write(os.urandom(64 * MiB))


def make_sparse_disk(path: str, size: int, written: int) -> None:
    """``written`` bytes of random data in 4 MiB runs spread over the disk, plus some zero blocks."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        runs = written // (4 * MiB)
        step = size // runs
        for i in range(runs):
            os.pwrite(fd, os.urandom(4 * MiB), i * step)
        os.pwrite(fd, bytes(16 * MiB), step // 2)  # written zeros: sent as a hole
    finally:
        os.close(fd)


def _receiver(keys: SessionKeys, port_q, staging: str, target: str, done_q) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_q.put(server.getsockname()[1])
        conn, _ = server.accept()
    with conn:
        cpu = time.process_time()
        result = receive_streams(conn, RecordLayer(keys, "destination"), staging,
                                 {"disk0": Expected("disk", target)})
        result.staging.commit()
        result.staging.close()
        done_q.put(time.process_time() - cpu)


def run_migsec(path: str, workdir: str) -> tuple[float, int, int, float, float]:
    """(seconds, wire bytes, allocated bytes, sender CPU s, receiver CPU s) for one file,
    sender and receiver in two processes."""
    keys = SessionKeys("bench-1", random_bytes(32), random_bytes(32), random_bytes(32), "a.example", "b.example")
    target = os.path.join(workdir, "received.img")
    staging = os.path.join(workdir, "staging")
    ctx = multiprocessing.get_context("fork")
    port_q, done_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(keys, port_q, staging, target, done_q))
    proc.start()
    port = port_q.get(timeout=30)
    start, cpu = time.perf_counter(), time.process_time()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        result = send_streams(sock, RecordLayer(keys, "source"), [StreamSource(1, "disk0", "disk", path=path)])
    elapsed, send_cpu = time.perf_counter() - start, time.process_time() - cpu
    recv_cpu = done_q.get(timeout=60)
    proc.join(30)
    allocated = result.manifest.streams[0].allocated
    os.unlink(target)
    return elapsed, result.wire_bytes, allocated, send_cpu, recv_cpu


class PrivateSshd:
    """An sshd of our own on a high loopback port, with a temp host key and authorized key."""

    def __init__(self, workdir: str) -> None:
        self.dir = os.path.join(workdir, "ssh")
        self.proc: subprocess.Popen | None = None
        self.note = ""

    def start(self) -> bool:
        sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
        if sshd is None or shutil.which("scp") is None or shutil.which("ssh-keygen") is None:
            self.note = "scp: skipped (sshd, scp or ssh-keygen not installed)"
            return False
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            # sshd running as root insists on its privilege-separation directory
            os.makedirs("/run/sshd", mode=0o755)
        d = self.dir
        os.makedirs(d, mode=0o700)
        for name in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, name)], check=True)
        shutil.copy(os.path.join(d, "user.pub"), os.path.join(d, "authorized_keys"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = os.path.join(d, "sshd_config")
        with open(config, "w") as fh:
            fh.write(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d}/host\n"
                     f"AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n"
                     f"StrictModes no\nPidFile {d}/sshd.pid\nUsePAM no\nPermitRootLogin yes\n"
                     "Subsystem sftp internal-sftp\n")
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", config], stderr=subprocess.PIPE)
        time.sleep(0.5)
        if self.proc.poll() is not None:
            self.note = f"scp: skipped (private sshd did not start: {self.proc.stderr.read().decode()[:200]!r})"
            return False
        return True

    def copy(self, path: str, workdir: str) -> str:
        d = self.dir
        dest = os.path.join(workdir, "scp-copy.img")
        argv = ["scp", "-q", "-c", "aes128-gcm@openssh.com", "-i", f"{d}/user", "-P", str(self.port),
                "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={d}/known_hosts",
                "-o", "BatchMode=yes", path, f"127.0.0.1:{dest}"]
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            return f"scp: failed ({done.stderr.decode()[:200]!r})"
        size = os.path.getsize(path)
        wire = size  # scp sends every byte, zeros included (plus SSH framing)
        os.unlink(dest)
        return (f"scp aes128-gcm: {elapsed:6.2f} s  {size / elapsed / 1e6:7.1f} MB/s logical  "
                f"payload on the wire >= {wire / MiB:.1f} MiB")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="256 MiB / 512 MiB instead of 1 / 2 GiB")
    parser.add_argument("--no-scp", action="store_true")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-transfer-", dir=args.dir)
    sshd = PrivateSshd(workdir)
    try:
        have_scp = not args.no_scp and sshd.start()
        scale = 4 if args.quick else 1
        cases = [("random", 1024 * MiB // scale, None), ("sparse", 2048 * MiB // scale, 300 * MiB // scale)]
        print(f"loopback TCP, sender and receiver in two processes, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        for name, size, written in cases:
            path = os.path.join(workdir, f"{name}.img")
            if written is None:
                make_random(path, size)
            else:
                make_sparse_disk(path, size, written)
            st = os.stat(path)
            print(f"== {name}: {size / MiB:.0f} MiB logical, {st.st_blocks * 512 / MiB:.0f} MiB allocated on disk")
            for attempt in (1, 2):
                elapsed, wire, allocated, send_cpu, recv_cpu = run_migsec(path, workdir)
                # CPU seconds are steadier than wall time on a shared machine: with each side
                # on its own idle core the slower side bounds the rate.
                print(f"migsec run {attempt}: {elapsed:6.2f} s  {size / elapsed / 1e6:7.1f} MB/s logical  "
                      f"wire {wire / MiB:.1f} MiB  data extents {allocated / MiB:.1f} MiB  "
                      f"wire/data {wire / max(allocated, 1):.4f}  "
                      f"wire/allocated-on-disk {wire / (st.st_blocks * 512):.4f}  "
                      f"CPU send {send_cpu:.2f} s recv {recv_cpu:.2f} s "
                      f"(bound {size / max(send_cpu, recv_cpu) / 1e6:.0f} MB/s)")
            if have_scp:
                print(sshd.copy(path, workdir))
            else:
                print(sshd.note or "scp: skipped (--no-scp)")
            os.unlink(path)
    finally:
        sshd.stop()
        shutil.rmtree(workdir, ignore_errors=True)

if __name__ == "__main__":
    main()

"""Deploy migsec into a running lab the way an operator would: CLI commands and TOML files.

A CA, one domain per lab host (``cloud-a.example`` on ``a``, ...), users, peers, the
default policies, a ``migsecd.toml`` per host, then ``migsecd`` started inside each
host's network and mount namespaces. Everything lives under ``<lab dir>/<host>/migsec``,
a path that is the same inside and outside the host.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from migsec.lab import Lab
from tests.site_layout import domain_and_paths

VENV = Path(sys.executable).parent
MIGSEC = str(VENV / "migsec")
MIGSECD = str(VENV / "migsecd")
PORT = 7443
ADMIN, ADMIN_PASSWORD = "admin", "correct horse battery staple"
GUEST, GUEST_PASSWORD = "visitor", "visitor password 1"


def did_of(host: str) -> str:
    return f"cloud-{host}.example"


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass
class Domain:
    lab: Lab
    host: str
    peers: list[str]
    process: subprocess.Popen | None = None
    log_handle: object = None

    @property
    def did(self) -> str:
        return did_of(self.host)

    @property
    def base(self) -> Path:
        return self.lab.host(self.host).dir / "migsec"

    @property
    def config(self) -> Path:
        return self.base / "migsecd.toml"

    @property
    def socket(self) -> Path:
        return self.base / "migsecd.sock"

    @property
    def log(self) -> Path:
        return self.base / "migsecd.log"

    @property
    def staging(self) -> Path:
        return self.base / "state" / "staging"

    @property
    def policy_dir(self) -> Path:
        return self.base / "policies"

    @property
    def address(self) -> str:
        return self.lab.host(self.host).address

    def migsec(self, *args: str, input: str | None = None, check: bool = False,
               timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``migsec ARGS`` inside this domain's host (as its administrator would)."""
        return self.lab.host(self.host).exec([MIGSEC, *args], input=input, check=check, timeout=timeout)

    # ---- setup -----------------------------------------------------------------------
    def write_config(self) -> None:
        lab_dir = self.lab.dir
        image_dir = self.lab.host(self.host).image_dir
        storage_map = ", ".join(f'"{lab_dir / p / "images"}" = "{image_dir}"' for p in self.peers)
        from migsec.lab.guest import DEFAULT_CACHE_DIR

        guest_cache = DEFAULT_CACHE_DIR  # the test guest's kernel + initramfs (a live guest boots from them)
        self.config.write_text(f"""\
# migsecd of {self.did} (lab host {self.host}); written by tests/e2e/deploy.py
{domain_and_paths(self.did)}
[listen]
peer = "{self.address}:{PORT}"
control_socket = "{self.socket}"
socket_mode = 0o660

[libvirt]
uri = "qemu:///system"

[storage]
image_dir = "{image_dir}"
map = {{ {storage_map} }}
boot_dirs = ["{guest_cache}"]

[limits]
max_incoming = 2
ticket_lifetime_s = 600
""")

    def write_policies(self, *, trusted: list[str] | None = None, accept_from: list[str] | None = None) -> None:
        trusted = [did_of(p) for p in self.peers] if trusted is None else trusted
        accept = trusted if accept_from is None else accept_from
        argv = [MIGSEC, "policy", "init-defaults", str(self.policy_dir), "--force",
                "--bandwidth-mib-s", "1000"]
        argv += [a for d in trusted for a in ("--trusted", d)]
        argv += [a for d in accept for a in ("--accept-from", d)]
        run(argv)

    # ---- the daemon ------------------------------------------------------------------
    def start(self, timeout: float = 30) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.log_handle = open(self.log, "ab")
        self.process = self.lab.host(self.host).popen(
            [MIGSECD, "--config", str(self.config)], stdin=subprocess.DEVNULL,
            stdout=self.log_handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"migsecd of {self.did} exited {self.process.returncode}; see {self.log}")
            if self.socket.exists() and self.migsec("jobs", "--config", str(self.config)).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"migsecd of {self.did} did not come up within {timeout} s; see {self.log}")

    def reload(self) -> None:
        assert self.process is not None
        # nsenter forks migsecd as its child; signal the daemon itself
        for pid in _children(self.process.pid) or [self.process.pid]:
            os.kill(pid, signal.SIGHUP)
        time.sleep(0.5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is None:
            return
        for pid in _children(self.process.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.process.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        if self.log_handle is not None:
            self.log_handle.close()
            self.log_handle = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@dataclass
class Deployment:
    lab: Lab
    domains: dict[str, Domain] = field(default_factory=dict)

    def __getitem__(self, host: str) -> Domain:
        return self.domains[host]

    def start(self) -> None:
        for d in self.domains.values():
            d.start()

    def stop(self) -> None:
        for d in self.domains.values():
            d.stop()


def deploy(lab: Lab, hosts: tuple[str, ...] = ("a", "b")) -> Deployment:
    """Set up CA, domains, users, peers, policies and configs (idempotent), not yet started."""
    ca = lab.dir / "ca"
    if not (ca / "ca-cert.pem").exists():
        run([MIGSEC, "ca", "init", str(ca), "--name", "migsec lab CA"])
    dep = Deployment(lab)
    for h in hosts:
        d = Domain(lab, h, [p for p in hosts if p != h])
        dep.domains[h] = d
        d.base.mkdir(parents=True, exist_ok=True)
        if not (d.base / "pki" / "domain-cert.pem").exists():
            run([MIGSEC, "ca", "issue", "--did", d.did, "--out", str(d.base / "pki"), "--ca", str(ca)])
        d.write_config()
        d.write_policies()
    for h, d in dep.domains.items():
        cfg = str(d.config)
        users = run([MIGSEC, "user", "list", "--config", cfg]).stdout
        if ADMIN not in users:
            run([MIGSEC, "user", "add", ADMIN, "--role", "migration-admin", "--password-stdin", "--config", cfg],
                input=ADMIN_PASSWORD + "\n")
        if GUEST not in users:
            run([MIGSEC, "user", "add", GUEST, "--password-stdin", "--config", cfg], input=GUEST_PASSWORD + "\n")
        known = run([MIGSEC, "peer", "list", "--config", cfg]).stdout
        for p in d.peers:
            peer = dep.domains[p]
            if peer.did not in known:
                run([MIGSEC, "peer", "add", peer.did, "--address", f"{peer.address}:{PORT}",
                     "--cert", str(peer.base / "pki" / "domain-cert.pem"), "--config", cfg])
    return dep

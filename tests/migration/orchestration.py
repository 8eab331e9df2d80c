"""Two domains in one process for the orchestrator tests: real Services, a real peer endpoint.

``pair(tmp_path)`` builds cloud-a.example (the source) and cloud-b.example (the destination)
from real config files (a real CA, ``render_default_policies``, peer directories), both on
libvirt's ``test:///default`` driver. B listens on a loopback port and answers with migsecd's own
code (``destination.serve_peer`` on a ``server.Daemon`` that is built but not started): the
handshake, the record layer, the data plane and the commit exchange are real on both sides.

test:///default is one hypervisor per process (its state lives while a connection is open):
the two sides share it, so the tests give each side its own domain names (A moves the stock
``test`` domain; B's copies get other names).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import gc
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migsec import virt
from migsec.auth.servers import Grant
from migsec.crypto import random_bytes
from migsec.config import load_config
from migsec.migration.dataplane import enrich_options
from migsec.daemon.server import Daemon
from migsec.daemon.services import Services
from migsec.pki import CertificateAuthority, PeerDirectory
from migsec.policy.defaults import render_default_policies
from migsec.protocol.messages import AuthorizationTicket, MigrationRequest
from site_layout import domain_and_paths

TEST_URI = "test:///default"
A_DID, B_DID = "cloud-a.example", "cloud-b.example"
USER = "alice"


class Clock:
    """A fixed-step clock for Services (tickets, decisions, ledger): no sleeping on wall time."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)

    def __call__(self) -> dt.datetime:
        return self.now


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site(root: Path, did: str, ca: CertificateAuthority, port: int) -> Path:
    root.mkdir(parents=True)
    ca.issue_domain(did, root / "pki")
    render_default_policies([B_DID], 8, 16, 1000, root / "policies", accept_from=[A_DID])
    config = root / "migsecd.toml"
    config.write_text(domain_and_paths(did) + f"""
[listen]
peer = "127.0.0.1:{port}"
control_socket = "{root}/d.sock"
[libvirt]
uri = "{TEST_URI}"
[storage]
image_dir = "{root}/images"
""")
    return config


class Endpoint:
    """B's peer listener: every connection is served by ``destination.serve_peer``.

    ``drop_after`` (bytes from A, per connection): forward that much, then cut the connection
    both ways, as a broken network would; None: no cut. ``delay`` (s): a slow peer, whose
    handshake starts that late.
    """

    def __init__(self, services: Services, port: int) -> None:
        self.daemon = Daemon(services)
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.connections = 0
        self.drop_after: int | None = None
        self.delay = 0.0
        self.thread = threading.Thread(target=self._accept, daemon=True, name="test-endpoint")
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, address = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            if self.drop_after is not None:
                conn = _cut_after(conn, self.drop_after)
            conn.setblocking(False)
            t = threading.Thread(target=asyncio.run, args=(self._serve(conn, address),), daemon=True)
            t.start()
            self.threads.append(t)

    async def _serve(self, conn: socket.socket, address: Any) -> None:
        from migsec.migration.destination import serve_peer

        await asyncio.sleep(self.delay)
        await serve_peer(self.daemon, conn, address)

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait for every connection B accepted to be fully served."""
        for t in list(self.threads):
            t.join(timeout)
            assert not t.is_alive(), "B's side did not finish"

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()
        self.thread.join(5)
        self.wait_idle()
        self.daemon.executor.shutdown(wait=True)


def _cut_after(conn: socket.socket, limit: int) -> socket.socket:
    """A relay (a socketpair) between A's connection and B that cuts after ``limit`` bytes from A."""
    near, far = socket.socketpair()

    def a_to_b() -> None:
        sent = 0
        try:
            while sent < limit:
                data = conn.recv(min(65536, limit - sent))
                if not data:
                    break
                far.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (conn, far):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        conn.close()

    def b_to_a() -> None:
        try:
            while True:
                data = far.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        far.close()

    threading.Thread(target=a_to_b, daemon=True).start()
    threading.Thread(target=b_to_a, daemon=True).start()
    return near


@dataclass
class Pair:
    a: Services
    b: Services
    endpoint: Endpoint
    root: Path
    conn: Any  # a test-driver connection held open for the test (keeps the driver's state)
    events: list[dict] = field(default_factory=list)

    def grant(self, vm: str = "test", **options: Any) -> Grant:
        """What A's AZ hands the VMM agent for ``vm`` (the request carries the VM facts, signed)."""
        info = virt.describe_domain(self.conn, vm)
        request = MigrationRequest(vm=vm, mode="cold", dest_did=B_DID,
                                   options=enrich_options(dict(options), info))
        now = self.a.clock()
        ticket = AuthorizationTicket(src_did=A_DID, dest_did=B_DID, user_id=USER, vm=vm,
                                     request_digest=request.digest(), nonce4=random_bytes(16), issued_at=now,
                                     expires_at=now + dt.timedelta(minutes=5))
        mid = random_bytes(8).hex()
        return Grant(mid, USER, ("migration-admin",), request, ticket, ticket.sign(self.a.identity.key), B_DID,
                     None)

    def guest(self, name: str = "vm1", *, disk_bytes: int = 256 * 1024, state: str = "running") -> Path:
        """Define (and start, unless ``state`` is "shutoff"; pause if "paused") a small guest with
        one raw disk file at A; returns the disk's path."""
        disk = self.root / "a" / "src" / f"{name}.img"
        disk.parent.mkdir(parents=True, exist_ok=True)
        disk.write_bytes(bytes(range(256)) * (disk_bytes // 256))
        virt.define_domain(self.conn, guest_xml(name, disk))
        if state != "shutoff":
            virt.start_domain(self.conn, name)
        if state == "paused":
            virt.suspend_domain(self.conn, name)
        return disk

    def state(self, name: str) -> str:
        from migsec.migration.source import domain_state

        return domain_state(self.conn, name)

    def close(self) -> None:
        self.endpoint.close()
        self.conn.close()


def guest_xml(name: str, disk: Path, uuid: str | None = None) -> str:
    import uuid as _uuid

    return f"""<domain type='test'>
  <name>{name}</name>
  <uuid>{uuid or _uuid.uuid4()}</uuid>
  <memory unit='KiB'>1024</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk>
  </devices>
</domain>"""


def pair(tmp_path: Path) -> Pair:
    gc.collect()  # a failed test's traceback can keep the driver's old state alive
    ca = CertificateAuthority.create(tmp_path / "ca", "orchestrator test CA")
    port_a, port_b = _free_port(), _free_port()
    config_a = _site(tmp_path / "a", A_DID, ca, port_a)
    config_b = _site(tmp_path / "b", B_DID, ca, port_b)
    PeerDirectory(tmp_path / "a" / "peers.json").add(
        B_DID, f"127.0.0.1:{port_b}", cert_pem=(tmp_path / "b" / "pki" / "domain-cert.pem").read_bytes())
    PeerDirectory(tmp_path / "b" / "peers.json").add(
        A_DID, f"127.0.0.1:{port_a}", cert_pem=(tmp_path / "a" / "pki" / "domain-cert.pem").read_bytes())
    clock = Clock()
    a = Services.load(load_config(config_a), clock=clock)
    b = Services.load(load_config(config_b), clock=clock)
    conn = virt.connect(TEST_URI)
    assert conn.list_domains() == ["test"], "test driver state leaked from another connection"
    return Pair(a, b, Endpoint(b, port_b), tmp_path, conn)


def phases(services: Any, mid: str) -> list[str]:
    """The journal phases of migration ``mid`` at one side, in order."""
    return [ph for ph, _ in services.journal.get(mid).history]

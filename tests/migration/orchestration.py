"""Two domains in one process for the orchestrator tests: real Services, a real peer endpoint.

``pair(tmp_path)`` builds cloud-a.example (the source) and cloud-b.example (the destination)
from real config files (a real CA, ``render_default_policies``, peer directories), both on
libvirt's ``test:///default`` driver. B listens on a loopback port and answers with migsecd's own
code (``endpoint.serve_peer`` on a ``server.Daemon`` that is built but not started): the
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
from migsec.auth.servers import Grant, plan_for
from migsec.crypto import random_bytes
from migsec.config import load_config
from migsec.daemon.endpoint import serve_peer
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
    """B's peer listener: every connection is served by ``endpoint.serve_peer``.

    ``drop_after`` (bytes from A, per connection): forward that much, then cut the connection
    both ways, as a broken network would; None: no cut. ``stall_after`` (bytes, the next
    connection only): then A's end is cut but B's goes silent, as a link that died without a
    reset: B learns nothing until A's resume supersedes it. ``delay`` (s): a slow peer, whose
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
        self.drop_once = False  # cut only the next connection after drop_after bytes
        self.stall_after: int | None = None
        self.cut = threading.Event()  # set: every open connection is cut, as a broken network would
        self.cuttable = False  # relay connections so that ``cut`` can cut them
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
            if self.stall_after is not None:
                conn, self.stall_after = _cut_after(conn, self.stall_after, silent_until=self.cut), None
            elif self.drop_after is not None:
                conn = _cut_after(conn, self.drop_after)
                if self.drop_once:
                    self.drop_after = None
            elif self.cuttable:
                conn = _cut_when(conn, self.cut)
            conn.setblocking(False)
            t = threading.Thread(target=asyncio.run, args=(self._serve(conn, address),), daemon=True)
            t.start()
            self.threads.append(t)

    async def _serve(self, conn: socket.socket, address: Any) -> None:
        await asyncio.sleep(self.delay)
        await serve_peer(self.daemon, conn, address)

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait for every connection B accepted to be fully served."""
        for t in list(self.threads):
            t.join(timeout)
            assert not t.is_alive(), "B's side did not finish"

    def close(self) -> None:
        self.stopping.set()
        self.cut.set()
        self.sock.close()
        self.thread.join(5)
        self.wait_idle()
        self.daemon.executor.shutdown(wait=True)


def _cut_after(conn: socket.socket, limit: int, *, silent_until: threading.Event | None = None) -> socket.socket:
    """A relay (a socketpair) between A's connection and B that cuts after ``limit`` bytes from A:
    both ways, or with ``silent_until`` A's end only, B's staying open and silent until it is set."""
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
        for s in (conn,) if silent_until is not None else (conn, far):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        conn.close()
        if silent_until is not None:
            silent_until.wait()
            far.close()

    def b_to_a() -> None:
        try:
            while True:
                data = far.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass  # silent: A's end is gone, B's answers go nowhere and B is not told
        if silent_until is None:
            far.close()

    threading.Thread(target=a_to_b, daemon=True).start()
    threading.Thread(target=b_to_a, daemon=True).start()
    return near


def _cut_when(conn: socket.socket, cut: threading.Event) -> socket.socket:
    """A relay between A's connection and B that cuts both ways once ``cut`` is set."""
    near, far = socket.socketpair()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data or cut.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass

    def watch() -> None:
        cut.wait()
        for s in (conn, far):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    threading.Thread(target=pump, args=(conn, far), daemon=True).start()
    threading.Thread(target=pump, args=(far, conn), daemon=True).start()
    threading.Thread(target=watch, daemon=True).start()
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
        """What A's AZ hands the VMM agent for ``vm`` (the request carries the VM's plan, signed)."""
        bare = MigrationRequest(vm=vm, mode="cold", dest_did=B_DID, options=options)
        request = MigrationRequest(vm=vm, mode="cold", dest_did=B_DID, options=options,
                                   plan=plan_for(bare, virt.describe_domain(self.conn, vm)))
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


# ---- the seam: what QEMU does and the test driver cannot ---------------------------------------------
class QemuLike:
    """The three hypervisor operations a cold move needs that libvirt's test driver lacks, done
    as QEMU's driver does them, on the test driver; everything else stays real.

    - ``save_domain(..., paused=True)``: the test driver refuses the flag; it saves without it
      and the image is framed as libvirt's QEMU driver writes it (``LibvirtQemudPart`` at
      offset 0 while writing, rewritten to ``LibvirtQemudSave`` as the last write), which A's
      growing memory stream follows.
    - ``save_image_xml``: reads the test driver's image inside that frame (B's check of the
      image's UUID, ``check_save_image``, stays real).
    - ``restore_domain(..., xml=..., paused=True)``: the test driver cannot restore with an XML
      or paused; B's copy is created paused from that XML (B's own mapping) under another name
      and UUID (``<name>-b``), since both sides share the one test hypervisor. Without an XML
      (A restarting its guest from its save image) the image is restored, then paused if asked.
      ``restore_name`` (which B journals before it restores) says so too.

    ``fail_save``: A's save fails; ``fail_restore``: B's restore fails (rollback branches).
    """

    def __init__(self, monkeypatch: Any) -> None:
        from migsec.virt import ops

        self._real_save, self._real_restore, self._real_xml = virt.save_domain, virt.restore_domain, ops.save_image_xml
        self._real_name = virt.restore_name
        self.fail_save = self.fail_restore = False
        self.restored: list[str] = []
        monkeypatch.setattr(virt, "save_domain", self.save_domain)
        monkeypatch.setattr(virt, "restore_domain", self.restore_domain)
        monkeypatch.setattr(virt, "restore_name", self.restore_name)
        monkeypatch.setattr(ops, "save_image_xml", self.save_image_xml)

    def save_domain(self, conn: Any, name: str, path: str, *, bypass_cache: bool = False,
                    paused: bool | None = None) -> None:
        from migsec.migration.dataplane import SAVE_MAGIC, SAVE_MAGIC_PARTIAL
        from migsec.errors import VirtError

        if self.fail_save:
            raise VirtError(f"save of {name} failed (test seam)")
        plain = Path(path + ".test")
        self._real_save(conn, name, str(plain))
        with open(path, "wb") as out:
            out.write(SAVE_MAGIC_PARTIAL + plain.read_bytes())
            out.flush()
            out.seek(0)
            out.write(SAVE_MAGIC)  # libvirt's last write
        plain.unlink()

    def _inner(self, path: str) -> str:
        from migsec.migration.dataplane import SAVE_MAGIC

        data = Path(path).read_bytes()
        if not data.startswith(SAVE_MAGIC):
            return path
        inner = Path(path + ".inner")
        inner.write_bytes(data[len(SAVE_MAGIC):])
        return str(inner)

    def save_image_xml(self, conn: Any, path: str) -> str:
        return self._real_xml(conn, self._inner(path))

    def restore_name(self, xml: str) -> str:
        return f"{self._real_name(xml)}-b"

    def restore_domain(self, conn: Any, path: str, *, xml: str | None = None, paused: bool | None = None,
                       bypass_cache: bool = False) -> str:
        import uuid as _uuid
        import xml.etree.ElementTree as ET

        from migsec.errors import VirtError

        if xml is None:
            name = self._real_restore(conn, self._inner(path))
            if paused:
                virt.suspend_domain(conn, name)
            return name
        if self.fail_restore:
            raise VirtError("restore failed (test seam)")
        root = ET.fromstring(xml)
        name = self.restore_name(xml)
        root.find("name").text = name  # type: ignore[union-attr]
        root.find("uuid").text = str(_uuid.uuid4())  # type: ignore[union-attr]
        conn.raw.createXML(ET.tostring(root, encoding="unicode"), 0)  # the test driver has no START_PAUSED
        if paused:
            virt.suspend_domain(conn, name)
        self.restored.append(name)
        return name

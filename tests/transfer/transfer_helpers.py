"""Helpers for transfer tests: real handshake keys, record layers over real sockets, sparse images."""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from migsec.crypto import random_bytes
from migsec.pki import CertificateAuthority, DomainIdentity, TrustStore
from migsec.protocol import (
    AuthorizationTicket,
    DestinationHandshake,
    MigrationAccepted,
    MigrationProposed,
    MigrationRequest,
    RecordLayer,
    ReplayCache,
    SessionKeys,
    SourceHandshake,
)

MiB = 1024 * 1024


A_DID = "cloud-a.example"
B_DID = "cloud-b.example"


@dataclass
class Domains:
    trust: TrustStore
    a: DomainIdentity
    b: DomainIdentity


@pytest.fixture(scope="session")
def domains(tmp_path_factory) -> Domains:
    """Two domains with real certificates from one federation CA."""
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(root / "ca", "transfer test CA")
    ids = {}
    for did in (A_DID, B_DID):
        ca.issue_domain(did, root / did)
        ids[did] = DomainIdentity.load(root / did / "domain-key.pem", root / did / "domain-cert.pem")
    return Domains(TrustStore.from_files([root / "ca" / "ca-cert.pem"]), ids[A_DID], ids[B_DID])


def handshake(domains: Domains, *, resume_of: str | None = None) -> SessionKeys:
    """Run the real two-message inter-domain handshake; both sides' SessionKeys must agree."""
    now = datetime.now(timezone.utc)
    request = MigrationRequest(vm="vm1", mode="cold", dest_did=B_DID)
    ticket = AuthorizationTicket(src_did=A_DID, dest_did=B_DID, user_id="alice", vm="vm1",
                                 request_digest=request.digest(), nonce4=random_bytes(16),
                                 issued_at=now, expires_at=now + timedelta(minutes=5))
    source = SourceHandshake(domains.a, domains.trust, peer_did=B_DID, peer_cert_pem=domains.b.cert_pem)
    dest = DestinationHandshake(domains.b, domains.trust, replay_cache=ReplayCache())
    dest.receive_data(source.initiate(request, ticket.sign(domains.a.key), resume_of=resume_of))
    proposal = dest.next_event()
    assert isinstance(proposal, MigrationProposed)
    source.receive_data(dest.accept())
    accepted = source.next_event()
    assert isinstance(accepted, MigrationAccepted)
    assert accepted.keys == dest.keys
    return accepted.keys


@pytest.fixture
def keys(domains) -> SessionKeys:
    return handshake(domains)


def layers(keys: SessionKeys) -> tuple[RecordLayer, RecordLayer]:
    return RecordLayer(keys, "source"), RecordLayer(keys, "destination")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (real kernel TCP, unlike socketpair's unix sockets)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    return client, peer


class Run(threading.Thread):
    """Run a callable in a thread, keep its result or exception."""

    def __init__(self, fn, *args, **kwargs) -> None:
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def value(self, timeout: float = 60):
        self.join(timeout)
        assert not self.is_alive(), "thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def make_sparse(path: str, size: int, writes: list[tuple[int, bytes]]) -> str:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for offset, data in writes:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return path


@pytest.fixture
def sparse_image(tmp_path):
    """A 64 MiB image: random data runs, written zero blocks, holes, an unaligned tail."""
    rnd = random_bytes
    writes = [
        (0, rnd(3 * MiB + 4096)),
        (5 * MiB, bytes(2 * MiB)),              # written zeros: must travel as a hole
        (8 * MiB + 123, rnd(70_000)),            # unaligned, straddles blocks
        (20 * MiB, rnd(MiB) + bytes(MiB) + rnd(MiB)),
        (64 * MiB - 5000, rnd(5000)),            # data at the very end
    ]
    return make_sparse(str(tmp_path / "disk.img"), 64 * MiB, writes)


class Relay:
    """A TCP relay between the source and the destination that counts the bytes on the wire.

    ``cut_after``: close both connections once that many source->destination bytes passed.
    ``flip_at``: invert the byte at that source->destination position (a tampered record).
    """

    def __init__(self, *, cut_after: int | None = None, flip_at: int | None = None) -> None:
        self.cut_after, self.flip_at = cut_after, flip_at
        self.a_to_b = 0
        self.b_to_a = 0
        self.cut = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._dest_server = socket.create_server(("127.0.0.1", 0))
        self.address = self._server.getsockname()

    def connect(self) -> tuple[socket.socket, socket.socket]:
        """(source end, destination end), joined through the relay."""
        src = socket.create_connection(self.address)
        up, _ = self._server.accept()
        down = socket.create_connection(self._dest_server.getsockname())
        dst, _ = self._dest_server.accept()
        self._conns = (up, down)
        threading.Thread(target=self._pump, args=(up, down, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()
        return src, dst

    def _pump(self, rx: socket.socket, tx: socket.socket, forward: bool) -> None:
        try:
            while not self.cut.is_set():
                data = rx.recv(256 * 1024)
                if not data:
                    tx.shutdown(socket.SHUT_WR)
                    return
                if forward:
                    pos = self.a_to_b
                    if self.flip_at is not None and pos <= self.flip_at < pos + len(data):
                        data = bytearray(data)
                        data[self.flip_at - pos] ^= 0x01
                    if self.cut_after is not None and pos + len(data) >= self.cut_after:
                        data = data[:self.cut_after - pos]
                        tx.sendall(data)
                        self.a_to_b += len(data)
                        self._cut()
                        return
                    self.a_to_b += len(data)
                else:
                    self.b_to_a += len(data)
                tx.sendall(data)
        except OSError:
            self._cut()

    def _cut(self) -> None:
        self.cut.set()
        for s in self._conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._server.close()
        self._dest_server.close()

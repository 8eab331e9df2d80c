"""Fixtures for transfer tests: keyed record layers over real sockets, sparse images."""
from __future__ import annotations

import os
import socket
import threading

import pytest

from migsec.crypto import random_bytes
from migsec.protocol import RecordLayer, SessionKeys

MiB = 1024 * 1024


def session_keys(migration_id: str = "mig-test-1") -> SessionKeys:
    """Fresh per-direction keys, as the handshake would hand them over."""
    return SessionKeys(migration_id=migration_id, a_to_b=random_bytes(32), b_to_a=random_bytes(32),
                       transcript_hash=random_bytes(32), src_did="cloud-a.example",
                       dest_did="cloud-b.example")


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

"""The live migration's byte channels (migsec.migration.bridge) between two real bridges.

A real handshake gives the keys, the session is a loopback TCP pair, the local ends are
real unix sockets: what a client writes at A's socket must come out at B's target and
back, with both sides' per-channel digests equal to SHA-256 of the bytes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transfer"))
from transfer_helpers import domains, handshake, layers, tcp_pair  # noqa: E402,F401

from migsec.migration.bridge import BridgeError, ChannelBridge, ChannelFilter  # noqa: E402


@pytest.fixture
def short_dir():
    d = tempfile.mkdtemp(prefix="mb-", dir="/tmp")  # unix socket paths must stay short
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


class Target:
    """A unix server at B: reads everything, answers ``reply(data)``, closes."""

    def __init__(self, path: Path, reply) -> None:
        self.path, self.reply = str(path), reply
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(4)
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            data = bytearray()
            while chunk := conn.recv(1 << 20):
                data += chunk
            self.received.append(bytes(data))
            conn.sendall(self.reply(bytes(data)))
            conn.close()


def session(domains):
    """A real handshake's record layers and a loopback TCP pair: (ra, rb, sa, sb)."""
    ra, rb = layers(handshake(domains))
    sa, sb = tcp_pair()
    return ra, rb, sa, sb


def bare_bridges(ra, rb, sa, sb):
    """A's and B's bridges on a session, B with no local targets."""
    return (ChannelBridge(sa, ra, role="source", peer_name="B"),
            ChannelBridge(sb, rb, role="destination", peer_name="A", connect_target=lambda k, c: (None, None)))


def pair(domains, short_dir, *, filters: dict | None = None):
    ra, rb, sa, sb = session(domains)
    targets: dict[str, str] = {}

    def connect_target(kind: str, channel: int):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(targets[kind])
        return s, (filters or {}).get(kind)

    a = ChannelBridge(sa, ra, role="source", peer_name="B")
    b = ChannelBridge(sb, rb, role="destination", peer_name="A", connect_target=connect_target)
    return a, b, targets


def client_exchange(path: str, payload: bytes) -> bytes:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    out = bytearray()
    while chunk := c.recv(1 << 20):
        out += chunk
    c.close()
    return bytes(out)


def test_bytes_cross_both_ways_and_both_sides_hash_the_same(domains, short_dir):
    a, b, targets = pair(domains, short_dir)
    target = Target(short_dir / "t-qemu", lambda d: hashlib.sha256(d).digest() * 1000)
    targets["qemu"] = target.path
    a.listen("qemu", str(short_dir / "qemu.sock"))
    assert oct(os.stat(short_dir / "qemu.sock").st_mode & 0o777) == "0o600"
    payload = os.urandom(5 * 1024 * 1024 + 17)
    answer = client_exchange(str(short_dir / "qemu.sock"), payload)
    assert answer == hashlib.sha256(payload).digest() * 1000
    assert target.received == [payload]
    a.wait_channels_done(10)
    b.wait_channels_done(10)
    assert a.digests() == b.digests()
    assert a.digests()["qemu.1.a2b"] == hashlib.sha256(payload).digest()
    assert a.digests()["qemu.1.b2a"] == hashlib.sha256(answer).digest()
    assert a.channel_bytes()["qemu.1.a2b"] == len(payload)
    a.send_control({"t": "hello", "n": 1})
    assert b.recv_control(5) == {"t": "hello", "n": 1}
    a.close()
    b.close()


class Refuser(ChannelFilter):
    """Answers the peer itself and forwards nothing (what B's RPC filter does with a refused call)."""

    def from_peer(self, data: bytes):
        return b"", b"refused:" + data[:8]

    def from_target(self, data: bytes):
        return b"", data


def test_a_filter_answers_the_peer_and_keeps_bytes_from_the_target(domains, short_dir):
    a, b, targets = pair(domains, short_dir, filters={"libvirt": Refuser()})
    target = Target(short_dir / "t-libvirt", lambda d: b"")
    targets["libvirt"] = target.path
    a.listen("libvirt", str(short_dir / "libvirt.sock"))
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(short_dir / "libvirt.sock"))
    c.sendall(b"list all domains please")
    assert c.recv(100) == b"refused:list all"
    c.close()
    a.wait_channels_done(10)
    b.wait_channels_done(10)
    assert target.received == [b""]  # the target never saw the refused bytes
    assert a.digests() == b.digests()
    a.close()
    b.close()


def test_a_cut_session_ends_every_local_connection_and_the_control_queue(domains, short_dir):
    a, b, targets = pair(domains, short_dir)
    hold = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hold.bind(str(short_dir / "t-nbd"))
    hold.listen(1)
    targets["nbd"] = str(short_dir / "t-nbd")
    a.listen("nbd", str(short_dir / "nbd.sock"))
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(short_dir / "nbd.sock"))
    c.sendall(b"x" * 1000)
    served, _ = hold.accept()
    assert served.recv(1000)
    # the link breaks (B's end of the TCP connection goes away)
    b.sock.shutdown(socket.SHUT_RDWR)
    c.settimeout(10)
    assert c.recv(10) == b""  # A's local client sees the channel end
    with pytest.raises(BridgeError):
        a.recv_control(10)
    with pytest.raises(BridgeError):
        a.wait_channels_done(1)
    a.close()
    b.close()


def test_the_source_never_accepts_an_open_and_unknown_kinds_are_refused(domains, short_dir):
    a, b, _ = pair(domains, short_dir)
    with pytest.raises(Exception, match="unknown channel kind"):
        a.listen("ssh", str(short_dir / "x.sock"))
    with pytest.raises(Exception, match="only the source"):
        b.listen("qemu", str(short_dir / "y.sock"))
    # B opening a channel towards A is a protocol violation that ends A's session
    with b._send_lock:
        b._send_frame(b.records.send_control(0, {"t": "open", "ch": 1, "kind": "qemu"}))
    with pytest.raises(BridgeError, match="destination opened"):
        a.recv_control(10)
    a.close()
    b.close()


def test_both_ends_of_the_session_send_small_records_at_once(domains, short_dir):
    # B's socket comes from accept() with Nagle on; a 16-byte NBD reply or the last segment of
    # an RPC reply would wait for the peer's (delayed) ACK
    ra, rb, sa, sb = session(domains)
    sb.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    a, b = bare_bridges(ra, rb, sa, sb)
    assert sa.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert sb.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    a.close()
    b.close()


def _at(names: list[str], prefix: str) -> int:
    hits = [i for i, name in enumerate(names) if name.startswith(prefix)]
    assert len(hits) == 1, (prefix, names)
    return hits[0]


def test_the_timeline_names_each_channel_end_and_control_message_in_order(domains, short_dir):
    a, b, targets = pair(domains, short_dir)
    target = Target(short_dir / "t-qemu", lambda d: b"ok")
    targets["qemu"] = target.path
    a.listen("qemu", str(short_dir / "qemu.sock"))
    payload = os.urandom(3 * 1024 * 1024)
    assert client_exchange(str(short_dir / "qemu.sock"), payload) == b"ok"
    a.wait_channels_done(10)
    b.wait_channels_done(10)
    a.send_control({"t": "decision"})
    assert b.recv_control(5) == {"t": "decision"}
    for bridge, mine, theirs in ((a, "a2b", "b2a"), (b, "b2a", "a2b")):
        events = bridge.timeline()
        times = [t for t, _ in events]
        assert times == sorted(times)
        names = [what for _, what in events]
        assert _at(names, f"qemu.1.{mine} first sent") <= _at(names, f"qemu.1.{mine} last sent")
        assert _at(names, f"qemu.1.{theirs} first received") <= _at(names, f"qemu.1.{theirs} last received")
    a_names = [what for _, what in a.timeline()]
    b_names = [what for _, what in b.timeline()]
    # at least 3 DATA records of at most 1 MiB carried the 3 MiB; the 2-byte answer took one
    records = int(a_names[_at(a_names, "qemu.1.a2b last sent")].split("(")[1].split()[0])
    assert records >= 3
    assert b_names[_at(b_names, "qemu.1.a2b last received")].endswith(f"({records} records)")
    assert b_names[_at(b_names, "qemu.1.b2a last sent")].endswith("(1 records)")
    end = "END sent on qemu.1 (%d bytes)" % len(payload)
    assert _at(a_names, "qemu.1.a2b last sent") < _at(a_names, end)
    assert _at(b_names, "qemu.1.a2b last received") < _at(b_names, "END received on qemu.1 (%d bytes)" % len(payload))
    assert "control decision sent" in a_names and "control decision received" in b_names
    a.close()
    b.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a socket to another group needs root")
def test_a_socket_for_a_non_root_qemu_is_given_to_its_group(domains, short_dir):
    import grp
    import stat

    gid = next((g.gr_gid for g in grp.getgrall() if g.gr_gid != 0), None)
    if gid is None:
        pytest.skip("no non-root group here")
    a, b, _ = pair(domains, short_dir)
    a.listen("nbd", str(short_dir / "nbd.sock"), group=gid)
    a.listen("qemu", str(short_dir / "qemu.sock"))
    nbd, qemu = os.stat(short_dir / "nbd.sock"), os.stat(short_dir / "qemu.sock")
    assert (nbd.st_gid, stat.S_IMODE(nbd.st_mode)) == (gid, 0o660)
    assert stat.S_IMODE(qemu.st_mode) == 0o600  # libvirtd (root) connects to the others
    a.close()
    b.close()


def test_the_session_buffers_in_the_bulk_direction_are_bounded(domains, short_dir):
    # one TCP connection carries every channel: megabytes of QEMU's stream queued in autotuned
    # buffers delay whatever record follows (the NBD flush at the switchover)
    from migsec.migration.bridge import SESSION_BUFFER

    ra, rb, sa, sb = session(domains)
    before_snd = sa.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    before_rcv = sb.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    a, b = bare_bridges(ra, rb, sa, sb)
    snd = sa.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    rcv = sb.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Linux doubles the value set (bookkeeping), and net.core.[rw]mem_max may cap it
    assert snd <= 2 * SESSION_BUFFER and rcv <= 2 * SESSION_BUFFER
    assert (snd, rcv) != (before_snd, before_rcv)
    a.close()
    b.close()


def test_the_libvirt_channel_commits_to_the_same_finish3_prefix_on_both_hosts(domains, short_dir):
    from migsec.migration.bridge import LocalEvent
    from migsec.protocol.errors import ProtocolError
    from migsec.protocol.libvirt_rpc import (PROC_CONNECT_CLOSE, PROC_DOMAIN_MIGRATE_FINISH3_PARAMS,
                                             REMOTE_PROGRAM, Header, MessageType, encode_packet)

    def packet(proc, mtype, serial, body=b""):
        return encode_packet(Header(REMOTE_PROGRAM, 1, proc, int(mtype), serial, 0), body)

    calls = packet(1, MessageType.CALL, 1) + packet(PROC_DOMAIN_MIGRATE_FINISH3_PARAMS, MessageType.CALL, 2, b"f" * 900)
    tail_call = packet(PROC_CONNECT_CLOSE, MessageType.CALL, 3)
    replies = packet(1, MessageType.REPLY, 1) + packet(PROC_DOMAIN_MIGRATE_FINISH3_PARAMS, MessageType.REPLY, 2, b"r" * 40)
    tail_reply = packet(PROC_CONNECT_CLOSE, MessageType.REPLY, 3)
    a, b, targets = pair(domains, short_dir)
    target = Target(short_dir / "t-libvirt", lambda d: replies + tail_reply)
    targets["libvirt"] = target.path
    a.listen("libvirt", str(short_dir / "libvirt.sock"))
    assert client_exchange(str(short_dir / "libvirt.sock"), calls + tail_call) == replies + tail_reply
    a.wait_channels_done(10)
    b.wait_channels_done(10)
    want = {"libvirt.1.a2b@finish3": hashlib.sha256(calls).digest(),
            "libvirt.1.b2a@finish3": hashlib.sha256(replies).digest()}
    assert a.commit_digests() == b.commit_digests() == want
    assert a.digests() == b.digests()  # and the whole directions, as the ENDs checked them
    assert a.digests()["libvirt.1.a2b"] == hashlib.sha256(calls + tail_call).digest()
    for bridge in (a, b):  # each host learnt that libvirt's successful Finish3 reply crossed
        event = bridge.recv_control(5)
        assert isinstance(event, LocalEvent) and event["t"] == "finish3" and event["ok"]
        assert bridge.finish3_ok()
    a.close()
    b.close()

    # a libvirt connection that never carried Finish3 has nothing to commit to
    a, b, targets = pair(domains, short_dir)
    (short_dir / "t-libvirt").unlink()
    targets["libvirt"] = Target(short_dir / "t-libvirt", lambda d: b"").path
    (short_dir / "libvirt.sock").unlink()
    a.listen("libvirt", str(short_dir / "libvirt.sock"))
    client_exchange(str(short_dir / "libvirt.sock"), packet(1, MessageType.CALL, 1))
    a.wait_channels_done(10)
    with pytest.raises(ProtocolError, match="no libvirt Finish3 call"):
        a.commit_digests()
    assert not a.finish3_ok()
    a.close()
    b.close()

"""RpcFilter: two-party exchanges (A's libvirtd <-> filter <-> B's libvirtd) built from
libvirt's wire encodings (remote_protocol.x), every refusal, and a decoder fuzz."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from migsec.errors import MappingError, MigsecError
from migsec.protocol import libvirt_rpc as rpc
from migsec.protocol.errors import RpcFilterError
from migsec.protocol.libvirt_rpc import (
    FinishDone, Forwarded, Header, MessageType, PrepareDone, Refused, RpcFilter, RpcPolicy,
    Status, TypedParam,
)
from migsec.protocol.xdr import XdrReader, XdrWriter

NAME = "vm1"
UUID = "6f1c2a9e-3b7d-4c1e-9a55-2d0e8b7f4c11"
MIGRATE_URI = "unix:///run/migsec/m1/qemu.sock"
DISKS_URI = "unix:///run/migsec/m1/nbd.sock"
FLAGS = (rpc.VIR_MIGRATE_LIVE | rpc.VIR_MIGRATE_PEER2PEER | rpc.VIR_MIGRATE_PERSIST_DEST
         | rpc.VIR_MIGRATE_UNDEFINE_SOURCE | rpc.VIR_MIGRATE_NON_SHARED_DISK)


def domain_xml(name: str = NAME, uuid: str = UUID, disk: str = "/srv/a/images/vm1.qcow2") -> str:
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>"
            "<memory unit='KiB'>262144</memory><os><type arch='x86_64'>hvm</type></os>"
            f"<devices><disk type='file' device='disk'><source file='{disk}'/>"
            "<target dev='vda' bus='virtio'/></disk></devices></domain>")


def rewrite(xml: str) -> str:
    """A stand-in for B's incoming_domain_xml: maps /srv/a -> /srv/b, refuses the rest."""
    if "/srv/a/" not in xml and "/srv/b/" not in xml:
        raise MappingError("disk: path outside this host's mapped storage")
    return xml.replace("/srv/a/", "/srv/b/")


def cookie(name: str = NAME, uuid: str = UUID, extra: str = "") -> bytes:
    return (f"<qemu-migration>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n"
            "  <hostname>a</hostname>\n  <hostuuid>11111111-2222-3333-4444-555555555555</hostuuid>\n"
            "  <feature name='nbd'/>\n"
            f"{extra}  <nbd>\n    <disk target='vda' capacity='1073741824'/>\n  </nbd>\n"
            "</qemu-migration>\n").encode() + b"\0"


def s(field_: str, value: str) -> TypedParam:
    return TypedParam(field_, rpc.PARAM_STRING, value)


def prepare_params(**over: str | None) -> list[TypedParam]:
    values = {"destination_xml": domain_xml(), "migrate_uri": MIGRATE_URI, "disks_uri": DISKS_URI}
    values.update(over)
    return [s(k, v) for k, v in values.items() if v is not None]


def call(proc: int, body: bytes = b"", serial: int = 1, *, prog: int = rpc.REMOTE_PROGRAM,
         type_: int = MessageType.CALL, status: int = Status.OK, vers: int = 1) -> bytes:
    return rpc.encode_packet(Header(prog, vers, proc, type_, serial, status), body)


def migrate_call(proc: int, params: list[TypedParam], cookie_: bytes, flags: int = FLAGS,
                 serial: int = 10, cancelled: int | None = None) -> bytes:
    args = rpc.MigrateArgs(tuple(params), cookie_, flags,
                           cancelled if proc == rpc.PROC_DOMAIN_MIGRATE_FINISH3_PARAMS else None)
    if proc == rpc.PROC_DOMAIN_MIGRATE_FINISH3_PARAMS and args.cancelled is None:
        args = rpc.MigrateArgs(args.params, args.cookie, args.flags, 0)
    return call(proc, rpc.encode_migrate_args(args), serial)


def prepare(serial: int = 10, **kw) -> bytes:
    params = kw.pop("params", None) or prepare_params()
    return migrate_call(rpc.PROC_DOMAIN_MIGRATE_PREPARE3_PARAMS, params, kw.pop("cookie_", cookie()),
                        serial=serial, **kw)


def finish(serial: int = 11, cancelled: int = 0, **kw) -> bytes:
    params = kw.pop("params", None) or [*prepare_params(), s("destination_name", NAME)]
    persistent = f"  {domain_xml()}\n"
    return migrate_call(rpc.PROC_DOMAIN_MIGRATE_FINISH3_PARAMS, params,
                        kw.pop("cookie_", cookie(extra=persistent)), serial=serial,
                        cancelled=cancelled, **kw)


def open_call(uri: str | None = "qemu:///system", serial: int = 3) -> bytes:
    return call(rpc.PROC_CONNECT_OPEN, bytes(XdrWriter().optional_string(uri).u32(0)), serial)


def feature(n: int, serial: int) -> bytes:
    return call(rpc.PROC_CONNECT_SUPPORTS_FEATURE, bytes(XdrWriter().i32(n)), serial)


PING = rpc.encode_packet(Header(rpc.KEEPALIVE_PROGRAM, 1, rpc.KEEPALIVE_PING, MessageType.MESSAGE, 0, 0))
PONG = rpc.encode_packet(Header(rpc.KEEPALIVE_PROGRAM, 1, rpc.KEEPALIVE_PONG, MessageType.MESSAGE, 0, 0))


def split(data: bytes) -> list[rpc.Packet]:
    return rpc.PacketDecoder(1 << 24, "test").feed(data)


@dataclass
class FakeLibvirtd:
    """B's libvirtd as far as the filter can tell: answers each call it receives."""

    fail_prepare: str | None = None
    calls: list[rpc.Packet] = field(default_factory=list)

    def answer(self, data: bytes) -> bytes:
        out = b""
        for p in split(data):
            self.calls.append(p)
            h = p.header
            if h.prog == rpc.KEEPALIVE_PROGRAM:
                if h.proc == rpc.KEEPALIVE_PING:
                    out += PONG
                continue
            reply = Header(h.prog, h.vers, h.proc, MessageType.REPLY, h.serial, Status.OK)
            body = b""
            if h.proc == rpc.PROC_AUTH_LIST:
                body = bytes(XdrWriter().u32(1).i32(0))          # [REMOTE_AUTH_NONE]
            elif h.proc == rpc.PROC_CONNECT_SUPPORTS_FEATURE:
                body = bytes(XdrWriter().i32(1))
            elif h.proc == rpc.PROC_DOMAIN_MIGRATE_PREPARE3_PARAMS:
                if self.fail_prepare:
                    reply = Header(h.prog, h.vers, h.proc, MessageType.REPLY, h.serial, Status.ERROR)
                    body = rpc.encode_remote_error(self.fail_prepare, code=1, domain=10)
                else:
                    body = bytes(XdrWriter().opaque(cookie()).optional_string(None))
            elif h.proc == rpc.PROC_DOMAIN_MIGRATE_FINISH3_PARAMS:
                body = bytes(XdrWriter().string(NAME).fixed_opaque(bytes.fromhex(UUID.replace("-", "")))
                             .i32(7).opaque(b""))
            out += rpc.encode_packet(reply, body)
        return out


def policy(**kw) -> RpcPolicy:
    return RpcPolicy(domain_name=NAME, domain_uuid=UUID, migrate_uri=MIGRATE_URI,
                     disks_uri=DISKS_URI, rewrite_xml=kw.pop("rewrite_xml", rewrite), **kw)


class Pair:
    """A's side writes calls; the filter passes them to a FakeLibvirtd and the answers back."""

    def __init__(self, **kw) -> None:
        self.filter = RpcFilter(policy(**{k: v for k, v in kw.items() if k != "server"}))
        self.server = kw.get("server") or FakeLibvirtd()
        self.to_a = b""

    def send(self, data: bytes) -> list:
        events = self.filter.client_data(data)
        events += self.filter.server_data(self.server.answer(self.filter.data_to_server()))
        self.to_a += self.filter.data_to_client()
        return events

    def replies(self) -> list[rpc.Packet]:
        out, self.to_a = split(self.to_a), b""
        return out

    def handshake(self) -> None:
        for data in (call(rpc.PROC_AUTH_LIST, serial=0), feature(10, 1), open_call(serial=2),
                     feature(14, 3), feature(15, 4), call(rpc.PROC_CONNECT_REGISTER_CLOSE_CALLBACK, serial=5),
                     feature(4, 6), feature(6, 7), feature(13, 8)):
            assert self.send(data) == [Forwarded(rpc.procedure_name(rpc.REMOTE_PROGRAM,
                                                                    split(data)[0].header.proc),
                                                 split(data)[0].header.serial)]
        self.replies()


def params_of(packet: rpc.Packet) -> dict[str, str]:
    finish_ = packet.header.proc == rpc.PROC_DOMAIN_MIGRATE_FINISH3_PARAMS
    args = rpc.decode_migrate_args(packet.body, finish=finish_)
    return {p.field: p.value for p in args.params}


# --- a whole p2p migration ------------------------------------------------------------------
def test_p2p_migration_passes_with_xml_and_cookie_rewritten() -> None:
    pair = Pair()
    assert pair.send(PING) == [Forwarded("KEEPALIVE_PING", 0)]
    assert split(pair.to_a)[0].raw == PONG
    pair.to_a = b""
    pair.handshake()
    assert pair.filter.state == rpc.IDLE

    assert pair.send(prepare()) == [Forwarded("DOMAIN_MIGRATE_PREPARE3_PARAMS", 10), PrepareDone(True, "")]
    seen = pair.server.calls[-1]
    params = params_of(seen)
    assert "/srv/b/images/vm1.qcow2" in params["destination_xml"]
    assert "/srv/a/" not in params["destination_xml"]
    assert params["migrate_uri"] == MIGRATE_URI
    (reply,) = pair.replies()
    assert (reply.header.serial, reply.header.status) == (10, Status.OK)
    assert pair.filter.state == rpc.PREPARED

    events = pair.send(finish())
    assert events == [Forwarded("DOMAIN_MIGRATE_FINISH3_PARAMS", 11), FinishDone(True, False, "")]
    seen = pair.server.calls[-1]
    args = rpc.decode_migrate_args(seen.body, finish=True)
    assert args.cookie.endswith(b"\0")
    root = etree.fromstring(args.cookie[:-1])
    assert root.tag == "qemu-migration" and root.findtext("name") == NAME
    assert root.find("domain/devices/disk/source").get("file") == "/srv/b/images/vm1.qcow2"
    assert root.find("nbd/disk").get("target") == "vda"      # the rest of the cookie is kept
    assert pair.filter.state == rpc.FINISHED

    for data in (call(rpc.PROC_CONNECT_UNREGISTER_CLOSE_CALLBACK, serial=12),
                 call(rpc.PROC_CONNECT_CLOSE, serial=13)):
        assert [type(e) for e in pair.send(data)] == [Forwarded]


def test_unchanged_calls_pass_byte_for_byte() -> None:
    pair = Pair()
    pair.handshake()
    sent = [call(rpc.PROC_AUTH_LIST, serial=0), feature(10, 1), open_call(serial=2)]
    assert [p.raw for p in pair.server.calls[:3]] == sent


def test_byte_at_a_time_gives_the_same_events() -> None:
    whole, trickle = Pair(), Pair()
    stream = call(rpc.PROC_AUTH_LIST, serial=0) + open_call(serial=1) + PING + prepare()
    expected = whole.filter.client_data(stream)
    got = []
    for i in range(len(stream)):
        got += trickle.filter.client_data(stream[i:i + 1])
    assert got == expected
    assert trickle.filter.data_to_server() == whole.filter.data_to_server()


def test_prepare_failure_at_b_then_finish_is_refused() -> None:
    pair = Pair(server=FakeLibvirtd(fail_prepare="internal error: qemu unexpectedly closed"))
    pair.handshake()
    assert pair.send(prepare())[-1] == PrepareDone(False, "internal error: qemu unexpectedly closed")
    assert pair.filter.state == rpc.PREPARE_FAILED
    (event,) = pair.send(finish())
    assert isinstance(event, Refused)


def test_cancelled_finish_is_reported() -> None:
    pair = Pair()
    pair.handshake()
    pair.send(prepare())
    assert pair.send(finish(cancelled=1))[-1] == FinishDone(True, True, "")


# --- refusals ----------------------------------------------------------------------------------
def expect_refused(pair: Pair, data: bytes, reason: str) -> Refused:
    pair.replies()
    before = len(pair.server.calls)
    events = pair.send(data)
    assert len(events) == 1 and isinstance(events[0], Refused), events
    assert reason in events[0].reason
    assert len(pair.server.calls) == before          # B's libvirtd never saw it
    (reply,) = pair.replies()
    sent = split(data)[0].header
    assert (reply.header.serial, reply.header.proc, reply.header.status) == (sent.serial, sent.proc,
                                                                             Status.ERROR)
    err = rpc.decode_remote_error(reply.body)
    assert err.code == rpc.VIR_ERR_OPERATION_DENIED and err.message.startswith("migsec: ")
    assert "/srv" not in err.message and "/run" not in err.message
    return events[0]


REFUSED_PREPARES = {
    "other domain name": (dict(params=prepare_params(destination_xml=domain_xml(name="vm2"))), "names domain"),
    "other uuid": (dict(params=prepare_params(destination_xml=domain_xml(uuid="6f1c2a9e-3b7d-4c1e-9a55-2d0e8b7f4c12"))), "uuid"),
    "renamed": (dict(params=[*prepare_params(), s("destination_name", "vm1x")]), "destination_name"),
    "tcp migrate_uri": (dict(params=prepare_params(migrate_uri="tcp://198.18.0.2:49152")), "migrate_uri"),
    "no migrate_uri": (dict(params=prepare_params(migrate_uri=None)), "without migrate_uri"),
    "other disks_uri": (dict(params=prepare_params(disks_uri="tcp://198.18.0.2:49153")), "disks_uri"),
    "copy without disks_uri": (dict(params=prepare_params(disks_uri=None)), "without disks_uri"),
    "listen_address": (dict(params=[*prepare_params(), s("listen_address", "0.0.0.0")]), "listen_address"),
    "disks_port": (dict(params=[*prepare_params(), TypedParam("disks_port", rpc.PARAM_INT, 49153)]), "disks_port"),
    "graphics_uri": (dict(params=[*prepare_params(), s("graphics_uri", "spice://x")]), "graphics_uri"),
    "unknown param": (dict(params=[*prepare_params(), s("destination_host", "x")]), "unknown"),
    "twice": (dict(params=[*prepare_params(), s("migrate_uri", MIGRATE_URI)]), "twice"),
    "int migrate_uri": (dict(params=[*prepare_params(migrate_uri=None),
                                     TypedParam("migrate_uri", rpc.PARAM_INT, 1)]), "must be a string"),
    "no destination_xml": (dict(params=prepare_params(destination_xml=None)), "without destination_xml"),
    "xml refused by B": (dict(params=prepare_params(destination_xml=domain_xml(disk="/etc/shadow"))), "outside"),
    "tunnelled flag": (dict(flags=FLAGS | rpc.VIR_MIGRATE_TUNNELLED), "TUNNELLED"),
    "postcopy flag": (dict(flags=FLAGS | rpc.VIR_MIGRATE_POSTCOPY), "POSTCOPY"),
    "unsafe flag": (dict(flags=FLAGS | rpc.VIR_MIGRATE_UNSAFE), "UNSAFE"),
    "cookie of other domain": (dict(cookie_=cookie(name="vm2")), "migration cookie names domain"),
    "cookie uuid": (dict(cookie_=cookie(uuid="6f1c2a9e-3b7d-4c1e-9a55-2d0e8b7f4c12")), "migration cookie has uuid"),
    "no cookie": (dict(cookie_=b""), "without a migration cookie"),
    "cookie network": (dict(cookie_=cookie(extra="<network><interface index='0' vporttype='openvswitch'/></network>")), "<network>"),
    "cookie unknown": (dict(cookie_=cookie(extra="<commandline/>")), "unknown migration cookie element"),
    "cookie persistent in prepare": (dict(cookie_=cookie(extra=domain_xml())), "persistent definition in the Prepare3"),
    "cookie entity": (dict(cookie_=b"<!DOCTYPE q [<!ENTITY e 'x'>]><qemu-migration><name>&e;</name></qemu-migration>\0"), "DOCTYPE"),
    "cookie not xml": (dict(cookie_=b"<qemu-migration>\0"), "not well-formed"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_PREPARES))
def test_prepare_refused(case: str) -> None:
    kw, reason = REFUSED_PREPARES[case]
    pair = Pair()
    pair.handshake()
    expect_refused(pair, prepare(**kw), reason)
    # one Prepare per migration, even when the first was refused
    expect_refused(pair, prepare(serial=20), "second Prepare3")


def test_second_prepare_refused() -> None:
    pair = Pair()
    pair.handshake()
    pair.send(prepare())
    expect_refused(pair, prepare(serial=12), "second Prepare3")
    pair.send(finish())
    expect_refused(pair, prepare(serial=13), "second Prepare3")


def test_finish_before_prepare_refused() -> None:
    pair = Pair()
    pair.handshake()
    expect_refused(pair, finish(), "before any Prepare3")


def test_finish_renamed_or_with_foreign_persistent_definition_refused() -> None:
    pair = Pair()
    pair.handshake()
    pair.send(prepare())
    expect_refused(pair, finish(cookie_=cookie(extra=domain_xml(name="vm2"))), "names domain")
    expect_refused(pair, finish(serial=12), "migration is finished")      # one Finish, refused or not


@pytest.mark.parametrize("data,reason", [
    (call(rpc.PROC_CONNECT_LIST_ALL_DOMAINS, bytes(XdrWriter().i32(1).u32(0)), 9), "CONNECT_LIST_ALL_DOMAINS"),
    (call(12, bytes(XdrWriter().string(NAME).fixed_opaque(b"\0" * 16).i32(1)), 9), "DOMAIN_DESTROY"),
    (call(rpc.PROC_DOMAIN_MIGRATE_PREPARE_TUNNEL3_PARAMS, b"", 9), "TUNNEL3"),
    (call(1, b"", 9, prog=rpc.QEMU_PROGRAM), "QEMU procedure 1"),
    (call(rpc.PROC_AUTH_LIST, b"", 9, type_=MessageType.CALL_WITH_FDS), "file descriptors"),
    (call(rpc.PROC_AUTH_LIST, b"", 9, vers=2), "version 2"),
    (open_call(serial=9), "second CONNECT_OPEN"),
])
def test_other_calls_refused(data: bytes, reason: str) -> None:
    pair = Pair()
    pair.handshake()
    expect_refused(pair, data, reason)


def test_calls_before_open_refused() -> None:
    pair = Pair()
    assert pair.send(call(rpc.PROC_AUTH_LIST, serial=0)) == [Forwarded("AUTH_LIST", 0)]
    pair.replies()
    expect_refused(pair, prepare(serial=1), "before CONNECT_OPEN")
    expect_refused(pair, open_call("test:///default", 2), "CONNECT_OPEN to 'test:///default'")
    expect_refused(pair, open_call("qemu:///session", 3), "CONNECT_OPEN to 'qemu:///session'")
    expect_refused(pair, open_call(None, 4), "CONNECT_OPEN to None")


def test_stream_frame_refused_with_a_stream_error() -> None:
    pair = Pair()
    pair.handshake()
    events = pair.send(call(rpc.PROC_DOMAIN_MIGRATE_PREPARE_TUNNEL3_PARAMS, b"x" * 64, 9,
                            type_=MessageType.STREAM, status=Status.CONTINUE))
    assert isinstance(events[0], Refused) and "STREAM" in events[0].reason
    (reply,) = pair.replies()
    assert (reply.header.type, reply.header.status, reply.header.serial) == (MessageType.STREAM, Status.ERROR, 9)
    assert not pair.server.calls[9:]


# --- malformed input: terminal error ---------------------------------------------------------
@pytest.mark.parametrize("data,match", [
    (rpc.LENGTH.pack(rpc.DEFAULT_MAX_PACKET + 1), "above the"),
    (rpc.LENGTH.pack(8) + b"\0" * 4, "below"),
    (call(rpc.PROC_AUTH_LIST, b"\0\0\0\0", 1), "trailing"),
    (call(rpc.PROC_CONNECT_OPEN, b"\0\0\0\2\0\0\0\0", 1), "boolean"),
    (call(rpc.PROC_CONNECT_OPEN, b"\0\0\0\1\0\0\0\x09qemu:///s\0\0\0", 1), "truncated"),
    (call(rpc.PROC_AUTH_LIST, b"", 1, type_=MessageType.REPLY), "REPLY"),
    (call(rpc.PROC_AUTH_LIST, b"", 1, status=Status.ERROR), "status"),
    (rpc.encode_packet(Header(rpc.KEEPALIVE_PROGRAM, 1, 3, MessageType.MESSAGE, 0, 0)), "keepalive"),
])
def test_malformed_packet_is_terminal(data: bytes, match: str) -> None:
    f = RpcFilter(policy())
    with pytest.raises(RpcFilterError, match=match):
        f.client_data(data)
    assert f.state == rpc.ERROR
    for later in (lambda: f.client_data(PING), lambda: f.server_data(PONG), f.data_to_server):
        with pytest.raises(RpcFilterError, match="stopped after an error"):
            later()


def test_oversize_packet_refused_from_the_length_alone() -> None:
    f = RpcFilter(policy(max_packet=64 * 1024))
    with pytest.raises(RpcFilterError, match="65537-byte packet"):
        f.client_data(rpc.LENGTH.pack(64 * 1024 + 1) + b"\0" * 100)


def test_serial_reused_while_pending_is_terminal() -> None:
    f = RpcFilter(policy())
    f.client_data(call(rpc.PROC_AUTH_LIST, serial=5))
    with pytest.raises(RpcFilterError, match="reused serial 5"):
        f.client_data(call(rpc.PROC_AUTH_LIST, serial=5))


def test_eof_inside_a_packet_is_an_error() -> None:
    f = RpcFilter(policy())
    f.client_data(PING[:10])
    with pytest.raises(RpcFilterError, match="inside a packet"):
        f.client_data(b"")


def test_policy_validates_itself() -> None:
    with pytest.raises(MigsecError, match="canonical"):
        RpcPolicy(NAME, UUID.upper(), MIGRATE_URI, DISKS_URI, rewrite)
    with pytest.raises(MigsecError, match="max_packet"):
        policy(max_packet=10)


# --- encodings against libvirt's own numbers ---------------------------------------------------
def test_constants_match_libvirt_python() -> None:
    libvirt = pytest.importorskip("libvirt")
    assert rpc.VIR_ERR_OPERATION_DENIED == libvirt.VIR_ERR_OPERATION_DENIED
    assert rpc.VIR_FROM_RPC == libvirt.VIR_FROM_RPC
    assert rpc.VIR_ERR_ERROR == libvirt.VIR_ERR_ERROR
    for value, name in rpc.FLAG_NAMES.items():
        assert getattr(libvirt, f"VIR_MIGRATE_{name}") == value, name
    for i, t in enumerate(("INT", "UINT", "LLONG", "ULLONG", "DOUBLE", "BOOLEAN", "STRING"), 1):
        assert getattr(libvirt, f"VIR_TYPED_PARAM_{t}") == i


def test_typed_params_round_trip() -> None:
    params = (TypedParam("bandwidth", rpc.PARAM_ULLONG, 2**63 + 5), TypedParam("x", rpc.PARAM_DOUBLE, 0.5),
              TypedParam("y", rpc.PARAM_LLONG, -3), TypedParam("z", rpc.PARAM_UINT, 7),
              TypedParam("b", rpc.PARAM_BOOLEAN, 1), s("migrate_disks", "vdé"))
    args = rpc.MigrateArgs(params, b"c\0", 0x5b)
    assert rpc.decode_migrate_args(rpc.encode_migrate_args(args), finish=False) == args


# --- fuzz: only MigsecError comes out ------------------------------------------------------------
def _valid_stream() -> bytes:
    return (call(rpc.PROC_AUTH_LIST, serial=0) + open_call(serial=1) + PING + prepare(serial=2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    for side in ("client_data", "server_data"):
        f = RpcFilter(policy())
        try:
            getattr(f, side)(data)
        except MigsecError:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_valid_traffic(data) -> None:
    stream = bytearray(_valid_stream())
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] = data.draw(st.integers(0, 255))
    f = RpcFilter(policy())
    try:
        events = f.client_data(bytes(stream))
    except MigsecError:
        return
    assert all(isinstance(e, (Forwarded, Refused)) for e in events)
    # whatever passed is still well-formed packets
    split(f.data_to_server())
    split(f.data_to_client())


def test_xdr_reader_names_the_problem() -> None:
    with pytest.raises(RpcFilterError, match="above its 3-byte limit"):
        XdrReader(bytes(XdrWriter().string("abcd")), "t").string(3, "s")
    with pytest.raises(RpcFilterError, match="padding"):
        XdrReader(b"\0\0\0\1a\0\0\1", "t").string(10, "s")


# --- replay of a real p2p migration (libvirt 9.0, captured by tests/lab/test_lab_rpc_filter.py) ---
def test_replay_of_real_libvirt_traffic() -> None:
    import json
    from pathlib import Path

    pytest.importorskip("libvirt")
    from migsec.virt.incoming import incoming_domain_xml

    cap = json.loads((Path(__file__).parent.parent / "data" / "protocol" /
                      "libvirt-p2p-capture.json").read_text())
    rule = functools.partial(incoming_domain_xml, disk_map={cap["a_images"]: cap["b_images"]},
                             expected_name=cap["name"], expected_uuid=cap["uuid"],
                             boot_dirs=(cap["boot_dir"],))
    f = RpcFilter(RpcPolicy(cap["name"], cap["uuid"], cap["migrate_uri"], cap["disks_uri"], rule))
    events, to_server, to_client = [], b"", b""
    for side, hexdata in cap["log"]:
        data = bytes.fromhex(hexdata)
        events += f.client_data(data) if side == "client" else f.server_data(data)
        to_server += f.data_to_server()
        to_client += f.data_to_client()
    assert [repr(e) for e in events] == cap["events"]
    assert f.state == rpc.FINISHED and f.close_answered
    # B's replies reach A unchanged; A's calls too, except the two migration calls
    server_sent = b"".join(bytes.fromhex(h) for s_, h in cap["log"] if s_ == "server")
    assert to_client == server_sent
    sent = {p.header.proc: p for p in split(to_server)}
    original = {p.header.proc: p for s_, h in cap["log"] if s_ == "client" for p in split(bytes.fromhex(h))}
    for proc in set(original) - {rpc.PROC_DOMAIN_MIGRATE_PREPARE3_PARAMS, rpc.PROC_DOMAIN_MIGRATE_FINISH3_PARAMS}:
        assert sent[proc].raw == original[proc].raw
    prepare_ = params_of(sent[rpc.PROC_DOMAIN_MIGRATE_PREPARE3_PARAMS])
    assert f"{cap['b_images']}/vm1.qcow2" in prepare_["destination_xml"]
    assert cap["a_images"] not in prepare_["destination_xml"]
    args = rpc.decode_migrate_args(sent[rpc.PROC_DOMAIN_MIGRATE_FINISH3_PARAMS].body, finish=True)
    persistent = etree.fromstring(args.cookie[:-1]).find("domain")
    assert persistent.find("devices/disk/source").get("file") == f"{cap['b_images']}/vm1.qcow2"
    assert args.flags == FLAGS == 0x5b


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256), st.booleans())
def test_fuzz_body_decoders(body: bytes, finish_: bool) -> None:
    for decode in (lambda: rpc.decode_migrate_args(body, finish=finish_),
                   lambda: rpc.decode_remote_error(body)):
        try:
            decode()
        except RpcFilterError:
            pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_prepare_reply_from_b(data) -> None:
    f = RpcFilter(policy())
    f.client_data(call(rpc.PROC_AUTH_LIST, serial=0) + open_call(serial=1) + prepare(serial=2))
    status = data.draw(st.sampled_from([Status.OK, Status.ERROR]))
    body = (rpc.encode_remote_error("no") if status == Status.ERROR
            else bytes(XdrWriter().opaque(cookie()).optional_string(None)))
    reply = bytearray(rpc.encode_packet(Header(rpc.REMOTE_PROGRAM, 1, 303, MessageType.REPLY, 2, status), body))
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(rpc.MIN_PACKET, len(reply) - 1))
        reply[i] = data.draw(st.integers(0, 255))
    try:
        events = f.server_data(bytes(reply))
    except MigsecError:
        return
    assert all(isinstance(e, PrepareDone) for e in events)

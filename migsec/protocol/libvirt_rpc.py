"""B's filtering proxy for the libvirt RPC connection of a peer-to-peer live migration.

In ``migsec migrate --live`` A's libvirtd opens its destination connection (dconn) to B
through migsec's encrypted channel; on B, migsecd hands those bytes to an ``RpcFilter``
instead of piping them to B's libvirtd. The filter is sans-IO (h11 style)::

    f = RpcFilter(policy)
    events = f.client_data(bytes_from_A)     # b"" = A closed
    events += f.server_data(bytes_from_Bs_libvirtd)
    write f.data_to_server() to B's libvirtd, f.data_to_client() back to A

Wire format (libvirt ``virnetprotocol.x``): each packet is ``length u32`` (counting itself)
+ header ``prog u32, vers u32, proc i32, type i32, serial u32, status i32`` + an XDR body.
The remote program is 0x20008086 v1; keepalive is 0x6b656570 (PING 1 / PONG 2).

What passes from A to B's libvirtd (everything else gets a ``remote_error`` reply from the
filter itself with VIR_ERR_OPERATION_DENIED and a short fixed message naming no local
path, and a ``Refused`` event carrying the detailed reason for the audit):

- keepalive PING/PONG, both ways;
- AUTH_LIST, CONNECT_SUPPORTS_FEATURE; CONNECT_OPEN once, to ``policy.connect_uri`` only;
  then CONNECT_(UN)REGISTER_CLOSE_CALLBACK, CONNECT_CLOSE;
- one DOMAIN_MIGRATE_PREPARE3_PARAMS, then (only after B accepted it) one
  DOMAIN_MIGRATE_FINISH3_PARAMS, both for ``policy.domain_name``/``domain_uuid`` only:
  flags within ``policy.allowed_flags``; params from an allow-list (``listen_address``,
  ``disks_port``, ``graphics_uri``, ``tls.destination`` and unknown names refused, one value
  per name except ``migrate_disks``); ``migrate_uri`` required in Prepare and equal to
  ``policy.migrate_uri``; ``disks_uri`` equal to ``policy.disks_uri`` (required when a
  NON_SHARED flag asks for a disk copy); ``destination_name`` equal to the domain name;
  ``destination_xml`` (required in Prepare) and ``persistent_xml`` replaced by
  ``policy.rewrite_xml(xml)``; the qemu-migration cookie parsed as untrusted XML
  (``migsec.safexml``: no DTD, no entities), its ``<name>``/``<uuid>`` equal to the domain's,
  only libvirt's known cookie elements (``<network>`` port data refused), and its
  persistent definition (a ``<domain>`` child of ``<qemu-migration>``, sent with Finish3 in
  p2p mode) replaced by ``policy.rewrite_xml``.

STREAM frames (tunnelled mode, which migsec does not use) are refused with a stream error;
calls with file descriptors and other programs (e.g. QEMU's monitor passthrough program) are
refused. Packets above ``policy.max_packet``, malformed headers or bodies of allowed calls,
and messages no libvirt client sends raise ``RpcFilterError``: the filter is then in a
terminal error state and every later call raises (the connection must be dropped; B's
libvirtd kills a prepared-but-unfinished incoming guest when its client connection closes).
Replies from B's libvirtd pass unchanged; the filter reads the Prepare3/Finish3 replies to
report ``PrepareDone`` / ``FinishDone``.

Additions beyond the first contract (backwards compatible): ``RpcFilter.state`` (the
migration phase, a string), ``RpcFilter.close_answered`` (B answered CONNECT_CLOSE, so B's
end-of-file that follows is the normal end), and the encoders/decoders below
(``encode_packet``, ``PacketDecoder``, ``TypedParam``, ``MigrateArgs``...) that the tests build
real traffic with.

Observed with libvirt 9.0 (tests/lab/test_lab_rpc_filter.py): when the filter refuses
Prepare3, A's libvirtd reports the filter's message to its caller in about half the runs and
"End of file while reading data" in the others (it frees the dconn after restoring the saved
error, and the end-of-file read while closing replaces it). Audit from the ``Refused`` event,
not from libvirt's message.
"""
from __future__ import annotations

import struct
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from migsec import safexml
from migsec.errors import MigsecError
from migsec.protocol.errors import RpcFilterError
from migsec.protocol.xdr import XdrReader, XdrWriter

# --- programs, message types, procedures (libvirt's numbers) ----------------------------
REMOTE_PROGRAM = 0x20008086
REMOTE_PROTOCOL_VERSION = 1
KEEPALIVE_PROGRAM = 0x6B656570
KEEPALIVE_PROTOCOL_VERSION = 1
KEEPALIVE_PING = 1
KEEPALIVE_PONG = 2
QEMU_PROGRAM = 0x20008087   # qemu-monitor-command passthrough: never allowed
LXC_PROGRAM = 0x00068000


class MessageType(IntEnum):
    CALL = 0
    REPLY = 1
    MESSAGE = 2
    STREAM = 3
    CALL_WITH_FDS = 4
    REPLY_WITH_FDS = 5
    STREAM_HOLE = 6


class Status(IntEnum):
    OK = 0
    ERROR = 1
    CONTINUE = 2


PROC_CONNECT_OPEN = 1
PROC_CONNECT_CLOSE = 2
PROC_CONNECT_SUPPORTS_FEATURE = 60
PROC_AUTH_LIST = 66
PROC_DOMAIN_MIGRATE_PREPARE3_PARAMS = 303
PROC_DOMAIN_MIGRATE_PREPARE_TUNNEL3_PARAMS = 304
PROC_DOMAIN_MIGRATE_FINISH3_PARAMS = 306
PROC_CONNECT_REGISTER_CLOSE_CALLBACK = 360
PROC_CONNECT_UNREGISTER_CLOSE_CALLBACK = 361
PROC_CONNECT_LIST_ALL_DOMAINS = 273

PROCEDURE_NAMES = {
    PROC_CONNECT_OPEN: "CONNECT_OPEN",
    PROC_CONNECT_CLOSE: "CONNECT_CLOSE",
    11: "DOMAIN_DEFINE_XML",
    12: "DOMAIN_DESTROY",
    23: "DOMAIN_LOOKUP_BY_NAME",
    24: "DOMAIN_LOOKUP_BY_UUID",
    59: "CONNECT_GET_HOSTNAME",
    PROC_CONNECT_SUPPORTS_FEATURE: "CONNECT_SUPPORTS_FEATURE",
    PROC_AUTH_LIST: "AUTH_LIST",
    PROC_CONNECT_LIST_ALL_DOMAINS: "CONNECT_LIST_ALL_DOMAINS",
    PROC_DOMAIN_MIGRATE_PREPARE3_PARAMS: "DOMAIN_MIGRATE_PREPARE3_PARAMS",
    PROC_DOMAIN_MIGRATE_PREPARE_TUNNEL3_PARAMS: "DOMAIN_MIGRATE_PREPARE_TUNNEL3_PARAMS",
    PROC_DOMAIN_MIGRATE_FINISH3_PARAMS: "DOMAIN_MIGRATE_FINISH3_PARAMS",
    PROC_CONNECT_REGISTER_CLOSE_CALLBACK: "CONNECT_REGISTER_CLOSE_CALLBACK",
    PROC_CONNECT_UNREGISTER_CLOSE_CALLBACK: "CONNECT_UNREGISTER_CLOSE_CALLBACK",
}

# --- limits (remote_protocol.x) ----------------------------------------------------------
REMOTE_STRING_MAX = 4194304
REMOTE_MIGRATE_COOKIE_MAX = 4194304
REMOTE_DOMAIN_MIGRATE_PARAM_LIST_MAX = 64
REMOTE_AUTH_TYPE_LIST_MAX = 20
HEADER = struct.Struct(">IIiiIi")
LENGTH = struct.Struct(">I")
MIN_PACKET = LENGTH.size + HEADER.size  # 28: a packet with an empty body (keepalive)

DEFAULT_MAX_PACKET = 4 * 1024 * 1024
"""The largest packet either side may send through the filter.

p2p's largest packet is Finish3 (two domain XML params and a cookie holding a third
definition), 8 KB measured for the lab guest; a domain XML with dozens of devices stays in
the tens of KiB. 4 MiB is libvirt's own limit on one string or cookie, a quarter of its
16 MiB whole-message limit, and bounds what a half-received packet makes the filter buffer.
"""

# --- virterror numbers used in the error replies ------------------------------------------
VIR_ERR_OPERATION_DENIED = 29
VIR_FROM_RPC = 7
VIR_ERR_ERROR = 2  # error level

# --- migration flags (virDomainMigrateFlags) -----------------------------------------------
VIR_MIGRATE_LIVE = 1 << 0
VIR_MIGRATE_PEER2PEER = 1 << 1
VIR_MIGRATE_TUNNELLED = 1 << 2
VIR_MIGRATE_PERSIST_DEST = 1 << 3
VIR_MIGRATE_UNDEFINE_SOURCE = 1 << 4
VIR_MIGRATE_PAUSED = 1 << 5
VIR_MIGRATE_NON_SHARED_DISK = 1 << 6
VIR_MIGRATE_NON_SHARED_INC = 1 << 7
VIR_MIGRATE_CHANGE_PROTECTION = 1 << 8
VIR_MIGRATE_UNSAFE = 1 << 9
VIR_MIGRATE_OFFLINE = 1 << 10
VIR_MIGRATE_COMPRESSED = 1 << 11
VIR_MIGRATE_ABORT_ON_ERROR = 1 << 12
VIR_MIGRATE_AUTO_CONVERGE = 1 << 13
VIR_MIGRATE_RDMA_PIN_ALL = 1 << 14
VIR_MIGRATE_POSTCOPY = 1 << 15
VIR_MIGRATE_TLS = 1 << 16
VIR_MIGRATE_PARALLEL = 1 << 17
VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES = 1 << 18
VIR_MIGRATE_POSTCOPY_RESUME = 1 << 19
VIR_MIGRATE_ZEROCOPY = 1 << 20

FLAG_NAMES = {value: name[len("VIR_MIGRATE_"):] for name, value in globals().items()
              if name.startswith("VIR_MIGRATE_")}

MIGSEC_LIVE_FLAGS = (
    VIR_MIGRATE_LIVE | VIR_MIGRATE_PEER2PEER | VIR_MIGRATE_PERSIST_DEST
    | VIR_MIGRATE_UNDEFINE_SOURCE | VIR_MIGRATE_PAUSED | VIR_MIGRATE_NON_SHARED_DISK
    | VIR_MIGRATE_NON_SHARED_INC | VIR_MIGRATE_CHANGE_PROTECTION | VIR_MIGRATE_COMPRESSED
    | VIR_MIGRATE_ABORT_ON_ERROR | VIR_MIGRATE_AUTO_CONVERGE
    | VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES
)
"""Flags a migsec live move may carry. Left out: TUNNELLED (memory inside the RPC as STREAM
frames; migsec carries it as its own channel), UNSAFE (skips B's safety checks), OFFLINE,
POSTCOPY/POSTCOPY_RESUME (the guest would run split across hosts, so a failure could lose
it), RDMA_PIN_ALL, TLS (QEMU's own TLS; the channel is already encrypted), PARALLEL and
ZEROCOPY (several connections on migrate_uri: not carried by the channel)."""

_NON_SHARED = VIR_MIGRATE_NON_SHARED_DISK | VIR_MIGRATE_NON_SHARED_INC

# --- typed params (virTypedParameterType) -----------------------------------------------
PARAM_INT, PARAM_UINT, PARAM_LLONG, PARAM_ULLONG, PARAM_DOUBLE, PARAM_BOOLEAN, PARAM_STRING = range(1, 8)

_STRING_PARAMS = {"migrate_uri", "disks_uri", "destination_name", "destination_xml",
                  "persistent_xml", "migrate_disks", "compression"}
_NUMBER_PARAMS = {"bandwidth", "compression.mt.level", "compression.mt.threads",
                  "compression.mt.dthreads", "compression.xbzrle.cache", "compression.zlib.level",
                  "compression.zstd.level", "auto_converge.initial", "auto_converge.increment"}
_REPEATABLE = {"migrate_disks", "compression"}
_REFUSED_PARAMS = {
    "listen_address": "B's QEMU listens only on migsec's socket",
    "disks_port": "B's NBD server listens only on migsec's socket",
    "graphics_uri": "graphics clients are not relocated through migsec",
    "tls.destination": "QEMU's own TLS is not used (the channel is encrypted)",
    "parallel.connections": "parallel migration connections are not carried",
    "bandwidth.postcopy": "post-copy is not allowed",
}
_XML_PARAMS = ("destination_xml", "persistent_xml")

# elements libvirt 9's qemu_migration_cookie.c writes under <qemu-migration>
_COOKIE_ELEMENTS = {"name", "uuid", "hostname", "hostuuid", "feature", "graphics", "lockstate",
                    "domain", "nbd", "statistics", "cpu", "capabilities", "blockDirtyBitmaps",
                    "memory-hotplug", "cpu-hotplug", "allowReboot"}


# --- events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Forwarded:
    """A call (or keepalive message) from A went on to B's libvirtd."""

    procedure: str
    serial: int


@dataclass(frozen=True)
class Refused:
    """A call from A was refused; the filter queued the RPC error reply to A itself.

    ``reason`` is the detailed local reason, for B's audit log (A sees a fixed message).
    """

    procedure: str
    serial: int
    reason: str


@dataclass(frozen=True)
class PrepareDone:
    """B's libvirtd answered Prepare3: ``ok`` = the incoming guest is waiting for the stream."""

    ok: bool
    message: str


@dataclass(frozen=True)
class FinishDone:
    """B's libvirtd answered Finish3: ``ok and not cancelled`` = the guest now runs at B."""

    ok: bool
    cancelled: bool
    message: str


Event = Forwarded | Refused | PrepareDone | FinishDone


# --- policy -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RpcPolicy:
    """What B lets through for one signed migration request."""

    domain_name: str
    domain_uuid: str
    migrate_uri: str
    disks_uri: str
    rewrite_xml: Callable[[str], str]
    connect_uri: str = "qemu:///system"
    allowed_flags: int = MIGSEC_LIVE_FLAGS
    max_packet: int = DEFAULT_MAX_PACKET

    def __post_init__(self) -> None:
        for name in ("domain_name", "domain_uuid", "migrate_uri", "disks_uri", "connect_uri"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise MigsecError(f"RpcPolicy.{name} must be a non-empty string, got {value!r}")
        if _canonical_uuid(self.domain_uuid) != self.domain_uuid:
            raise MigsecError(f"RpcPolicy.domain_uuid {self.domain_uuid!r} is not a canonical "
                              "lower-case uuid")
        if not callable(self.rewrite_xml):
            raise MigsecError("RpcPolicy.rewrite_xml must be callable")
        if not isinstance(self.allowed_flags, int) or self.allowed_flags < 0:
            raise MigsecError(f"RpcPolicy.allowed_flags must be a flag mask, got {self.allowed_flags!r}")
        if not isinstance(self.max_packet, int) or not MIN_PACKET <= self.max_packet <= 16 * 1024 * 1024:
            raise MigsecError(f"RpcPolicy.max_packet must be {MIN_PACKET}..16 MiB, got {self.max_packet!r}")


# --- packets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    prog: int
    vers: int
    proc: int
    type: int
    serial: int
    status: int


@dataclass(frozen=True)
class Packet:
    header: Header
    body: bytes
    raw: bytes = field(repr=False, default=b"")


def encode_packet(header: Header, body: bytes = b"") -> bytes:
    """One wire packet: length (including itself) + header + body."""
    h = header
    return (LENGTH.pack(MIN_PACKET + len(body))
            + HEADER.pack(h.prog, h.vers, h.proc, h.type, h.serial, h.status) + body)


class PacketDecoder:
    """Splits a byte stream into packets; the length is checked before the body is awaited."""

    def __init__(self, max_packet: int, side: str) -> None:
        self._buf = bytearray()
        self._max = max_packet
        self._side = side

    def feed(self, data: bytes) -> list[Packet]:
        self._buf += data
        packets: list[Packet] = []
        while len(self._buf) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._buf)
            if length < MIN_PACKET:
                raise RpcFilterError(f"{self._side} sent a packet of length {length}, below "
                                     f"the {MIN_PACKET}-byte header")
            if length > self._max:
                raise RpcFilterError(f"{self._side} sent a {length}-byte packet, above the "
                                     f"{self._max}-byte limit")
            if len(self._buf) < length:
                break
            raw = bytes(self._buf[:length])
            del self._buf[:length]
            header = Header(*HEADER.unpack_from(raw, LENGTH.size))
            packets.append(Packet(header, raw[MIN_PACKET:], raw))
        return packets

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet held back."""
        return len(self._buf)


# --- bodies -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TypedParam:
    """One ``remote_typed_param``: ``type`` is a PARAM_* number."""

    field: str
    type: int
    value: int | float | str


@dataclass(frozen=True)
class MigrateArgs:
    """Prepare3Params (``cancelled`` None) or Finish3Params arguments."""

    params: tuple[TypedParam, ...]
    cookie: bytes
    flags: int
    cancelled: int | None = None


def decode_params(r: XdrReader) -> tuple[TypedParam, ...]:
    n = r.u32("params count")
    if n > REMOTE_DOMAIN_MIGRATE_PARAM_LIST_MAX:
        raise RpcFilterError(f"{n} typed params, above libvirt's {REMOTE_DOMAIN_MIGRATE_PARAM_LIST_MAX}")
    params = []
    for _ in range(n):
        name = r.string(REMOTE_STRING_MAX, "param name")
        kind = r.i32("param type")
        if kind in (PARAM_INT, PARAM_BOOLEAN):
            value: int | float | str = r.i32(name)
        elif kind == PARAM_UINT:
            value = r.u32(name)
        elif kind == PARAM_LLONG:
            value = r.i64(name)
        elif kind == PARAM_ULLONG:
            value = r.u64(name)
        elif kind == PARAM_DOUBLE:
            value = r.f64(name)
        elif kind == PARAM_STRING:
            value = r.string(REMOTE_STRING_MAX, name)
        else:
            raise RpcFilterError(f"typed param {name!r} has unknown type {kind}")
        params.append(TypedParam(name, kind, value))
    return tuple(params)


def encode_params(w: XdrWriter, params: tuple[TypedParam, ...]) -> None:
    w.u32(len(params))
    for p in params:
        w.string(p.field).i32(p.type)
        if p.type in (PARAM_INT, PARAM_BOOLEAN):
            w.i32(int(p.value))
        elif p.type == PARAM_UINT:
            w.u32(int(p.value))
        elif p.type == PARAM_LLONG:
            w.i64(int(p.value))
        elif p.type == PARAM_ULLONG:
            w.u64(int(p.value))
        elif p.type == PARAM_DOUBLE:
            w.f64(float(p.value))
        else:
            w.string(str(p.value))


def decode_migrate_args(body: bytes, *, finish: bool) -> MigrateArgs:
    """Prepare3Params args (``finish=False``) or Finish3Params args."""
    r = XdrReader(body, "Finish3 arguments" if finish else "Prepare3 arguments")
    params = decode_params(r)
    cookie = r.opaque(REMOTE_MIGRATE_COOKIE_MAX, "cookie")
    flags = r.u32("flags")
    cancelled = r.i32("cancelled") if finish else None
    r.done()
    return MigrateArgs(params, cookie, flags, cancelled)


def encode_migrate_args(args: MigrateArgs) -> bytes:
    w = XdrWriter()
    encode_params(w, args.params)
    w.opaque(args.cookie).u32(args.flags)
    if args.cancelled is not None:
        w.i32(args.cancelled)
    return bytes(w)


@dataclass(frozen=True)
class RemoteError:
    """The parts of a ``remote_error`` a reader needs."""

    code: int
    domain: int
    message: str | None
    level: int


def encode_remote_error(message: str, *, code: int = VIR_ERR_OPERATION_DENIED,
                        domain: int = VIR_FROM_RPC) -> bytes:
    w = XdrWriter().i32(code).i32(domain).optional_string(message).i32(VIR_ERR_ERROR)
    w.boolean(False)                                   # dom
    w.optional_string(message).optional_string(None).optional_string(None)  # str1..3
    w.i32(-1).i32(-1).boolean(False)                   # int1, int2, net
    return bytes(w)


def decode_remote_error(body: bytes) -> RemoteError:
    r = XdrReader(body, "remote_error")
    code, dom_ = r.i32("code"), r.i32("domain")
    message = r.optional_string(REMOTE_STRING_MAX, "message")
    level = r.i32("level")
    if r.boolean("dom presence"):
        r.string(REMOTE_STRING_MAX, "dom name")
        r.fixed_opaque(16, "dom uuid")
        r.i32("dom id")
    for item in ("str1", "str2", "str3"):
        r.optional_string(REMOTE_STRING_MAX, item)
    r.i32("int1")
    r.i32("int2")
    if r.boolean("net presence"):
        r.string(REMOTE_STRING_MAX, "net name")
        r.fixed_opaque(16, "net uuid")
    r.done()
    return RemoteError(code, dom_, message, level)


def procedure_name(prog: int, proc: int) -> str:
    if prog == KEEPALIVE_PROGRAM:
        return {KEEPALIVE_PING: "KEEPALIVE_PING", KEEPALIVE_PONG: "KEEPALIVE_PONG"}.get(
            proc, f"KEEPALIVE_{proc}")
    if prog != REMOTE_PROGRAM:
        names = {QEMU_PROGRAM: "QEMU", LXC_PROGRAM: "LXC"}
        return f"{names.get(prog, hex(prog))} procedure {proc}"
    return PROCEDURE_NAMES.get(proc, f"procedure {proc}")


def flag_names(flags: int) -> str:
    names = [FLAG_NAMES.get(1 << i, f"0x{1 << i:x}") for i in range(32) if flags & (1 << i)]
    return "|".join(names) or "0"


def _canonical_uuid(text: str) -> str | None:
    try:
        return str(uuidlib.UUID(text.strip()))
    except (ValueError, AttributeError):
        return None


class _Refusal(Exception):
    """Internal: a rule refused the call (detail for the audit, public text for A)."""

    def __init__(self, detail: str, public: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.public = public


_PUBLIC_PROCEDURE = "not allowed on migsec's migration channel"
_PUBLIC_DOMAIN = "only the migration of the domain in migsec's signed request is allowed"
_PUBLIC_PARAMS = "migration parameters or flags not allowed by migsec"
_PUBLIC_XML = "the domain XML does not pass the destination's migsec rules (see its audit log)"
_PUBLIC_ORDER = "out of order: migsec allows one Prepare, then its Finish"
_PUBLIC_STREAM = "tunnelled migration streams are not carried by migsec"


# --- the filter --------------------------------------------------------------------------------------
IDLE = "idle"                        # no Prepare seen
PREPARING = "preparing"              # Prepare3 forwarded, reply awaited
PREPARED = "prepared"                # B accepted Prepare3: Finish3 may follow
PREPARE_FAILED = "prepare-failed"    # Prepare3 refused by the filter or failed at B
FINISHING = "finishing"              # Finish3 forwarded, reply awaited
FINISHED = "finished"                # B answered Finish3 (or the filter refused it)
ERROR = "error"                      # terminal: every call raises


class RpcFilter:
    """Sits between A's libvirtd (client side) and B's libvirtd (server side)."""

    def __init__(self, policy: RpcPolicy) -> None:
        if not isinstance(policy, RpcPolicy):
            raise MigsecError(f"RpcFilter needs an RpcPolicy, not {type(policy).__name__}")
        self._policy = policy
        self._from_client = PacketDecoder(policy.max_packet, "A's libvirtd")
        self._from_server = PacketDecoder(policy.max_packet, "B's libvirtd")
        self._to_server = bytearray()
        self._to_client = bytearray()
        self._phase = IDLE
        self._opened = False
        self._pending: dict[int, int] = {}   # serial -> procedure of forwarded calls
        self._prepare_serial: int | None = None
        self._finish_serial: int | None = None
        self._finish_cancelled = False
        self._close_serial: int | None = None
        self._close_answered = False
        self._error: RpcFilterError | None = None

    # -- I/O surface --------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """The migration phase: idle, preparing, prepared, prepare-failed, finishing,
        finished, or error."""
        return ERROR if self._error is not None else self._phase

    @property
    def close_answered(self) -> bool:
        """B's libvirtd answered CONNECT_CLOSE, so it is about to hang up.

        A bridge can then take B's end-of-file as the normal end and wait for A to hang up
        too, rather than report a lost connection.
        """
        return self._close_answered

    def client_data(self, data: bytes) -> list[Event]:
        """Bytes that arrived from A's libvirtd (``b""``: A closed the connection)."""
        return self._guarded(self._client_data, data, "A's libvirtd")

    def server_data(self, data: bytes) -> list[Event]:
        """Bytes that arrived from B's libvirtd (``b""``: it closed the connection)."""
        return self._guarded(self._server_data, data, "B's libvirtd")

    def data_to_server(self) -> bytes:
        """Take the bytes to write to B's libvirtd."""
        self._check()
        out = bytes(self._to_server)
        self._to_server.clear()
        return out

    def data_to_client(self) -> bytes:
        """Take the bytes to write back to A."""
        self._check()
        out = bytes(self._to_client)
        self._to_client.clear()
        return out

    def _check(self) -> None:
        if self._error is not None:
            raise RpcFilterError(f"the libvirt RPC filter stopped after an error: {self._error}")

    def _guarded(self, handler: Callable[[bytes], list[Event]], data: bytes, side: str) -> list[Event]:
        self._check()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        try:
            if not data:
                decoder = self._from_client if handler == self._client_data else self._from_server
                if decoder.pending:
                    raise RpcFilterError(f"{side} closed the connection inside a packet "
                                         f"({decoder.pending} bytes of it received)")
                return []
            return handler(bytes(data))
        except RpcFilterError as exc:
            self._error = exc
            raise
        except MigsecError as exc:   # e.g. a rewrite rule failing in an unexpected place
            self._error = RpcFilterError(str(exc))
            raise self._error from exc

    # -- client side ---------------------------------------------------------------------------
    def _client_data(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for packet in self._from_client.feed(data):
            events.append(self._client_packet(packet))
        return events

    def _client_packet(self, packet: Packet) -> Event:
        h = packet.header
        name = procedure_name(h.prog, h.proc)
        if h.prog == KEEPALIVE_PROGRAM:
            self._keepalive(packet, "A's libvirtd")
            self._to_server += packet.raw
            return Forwarded(name, h.serial)
        if h.type == MessageType.STREAM or h.type == MessageType.STREAM_HOLE:
            return self._refuse(packet, name, "STREAM frame from A refused (tunnelled "
                                "migration is not used)", _PUBLIC_STREAM, stream=True)
        if h.type not in (MessageType.CALL, MessageType.CALL_WITH_FDS):
            raise RpcFilterError(f"A's libvirtd sent a {_type_name(h.type)} message for {name}; "
                                 "a client only sends calls, stream data and keepalives")
        if h.status != Status.OK:
            raise RpcFilterError(f"A's libvirtd sent a call {name} with status {h.status}, not OK")
        if h.serial in self._pending:
            raise RpcFilterError(f"A's libvirtd reused serial {h.serial} while that call is "
                                 "still unanswered")
        if h.prog != REMOTE_PROGRAM:
            return self._refuse(packet, name, f"{name} refused: only libvirt's remote program "
                                "is allowed", _PUBLIC_PROCEDURE)
        if h.vers != REMOTE_PROTOCOL_VERSION:
            return self._refuse(packet, name, f"remote protocol version {h.vers} refused",
                                _PUBLIC_PROCEDURE)
        if h.type == MessageType.CALL_WITH_FDS:
            return self._refuse(packet, name, f"{name} with file descriptors refused",
                                _PUBLIC_PROCEDURE)
        try:
            body = self._check_call(h.proc, packet.body, name)
        except _Refusal as refusal:
            return self._refuse(packet, name, refusal.detail, refusal.public)
        raw = packet.raw if body is None else encode_packet(h, body)
        self._pending[h.serial] = h.proc
        if h.proc == PROC_CONNECT_CLOSE:
            self._close_serial = h.serial
        elif h.proc == PROC_DOMAIN_MIGRATE_PREPARE3_PARAMS:
            self._phase, self._prepare_serial = PREPARING, h.serial
        elif h.proc == PROC_DOMAIN_MIGRATE_FINISH3_PARAMS:
            self._phase, self._finish_serial = FINISHING, h.serial
        self._to_server += raw
        return Forwarded(name, h.serial)

    def _check_call(self, proc: int, body: bytes, name: str) -> bytes | None:
        """Apply the rules to one call; returns a rewritten body, or None to forward as is."""
        if proc in (PROC_AUTH_LIST, PROC_CONNECT_CLOSE, PROC_CONNECT_REGISTER_CLOSE_CALLBACK,
                    PROC_CONNECT_UNREGISTER_CLOSE_CALLBACK):
            XdrReader(body, name).done()
            if proc != PROC_AUTH_LIST:
                self._require_open(name)
            return None
        if proc == PROC_CONNECT_SUPPORTS_FEATURE:
            r = XdrReader(body, name)
            r.i32("feature")
            r.done()
            return None
        if proc == PROC_CONNECT_OPEN:
            r = XdrReader(body, name)
            uri = r.optional_string(REMOTE_STRING_MAX, "name")
            r.u32("flags")
            r.done()
            if self._opened:
                raise _Refusal("a second CONNECT_OPEN refused", _PUBLIC_ORDER)
            if uri != self._policy.connect_uri:
                raise _Refusal(f"CONNECT_OPEN to {uri!r} refused (only "
                               f"{self._policy.connect_uri!r})", _PUBLIC_PROCEDURE)
            self._opened = True
            return None
        if proc == PROC_DOMAIN_MIGRATE_PREPARE3_PARAMS:
            self._require_open(name)
            return self._prepare(body)
        if proc == PROC_DOMAIN_MIGRATE_FINISH3_PARAMS:
            self._require_open(name)
            return self._finish(body)
        raise _Refusal(f"{name} is not a procedure of a migsec live migration", _PUBLIC_PROCEDURE)

    def _require_open(self, name: str) -> None:
        if not self._opened:
            raise _Refusal(f"{name} before CONNECT_OPEN refused", _PUBLIC_ORDER)

    def _prepare(self, body: bytes) -> bytes | None:
        args = decode_migrate_args(body, finish=False)
        if self._phase != IDLE:
            raise _Refusal(f"a second Prepare3 refused (migration is {self._phase})", _PUBLIC_ORDER)
        self._phase = PREPARE_FAILED   # one attempt: a refused Prepare is not retried
        self._check_flags(args.flags)
        params = self._check_params(args.params, args.flags, prepare=True)
        cookie = self._check_cookie(args.cookie, persistent_allowed=False, required=True)
        return self._reencode(args, params, cookie)

    def _finish(self, body: bytes) -> bytes | None:
        args = decode_migrate_args(body, finish=True)
        if self._phase != PREPARED:
            detail = ("Finish3 before any Prepare3 refused" if self._phase == IDLE
                      else f"Finish3 refused: migration is {self._phase}")
            raise _Refusal(detail, _PUBLIC_ORDER)
        self._phase = FINISHED         # one attempt: a refused Finish ends the migration
        self._finish_cancelled = bool(args.cancelled)
        self._check_flags(args.flags)
        params = self._check_params(args.params, args.flags, prepare=False)
        cookie = self._check_cookie(args.cookie, persistent_allowed=True, required=False)
        return self._reencode(args, params, cookie)

    @staticmethod
    def _reencode(args: MigrateArgs, params: tuple[TypedParam, ...], cookie: bytes) -> bytes | None:
        if params == args.params and cookie == args.cookie:
            return None
        return encode_migrate_args(MigrateArgs(params, cookie, args.flags, args.cancelled))

    def _check_flags(self, flags: int) -> None:
        extra = flags & ~self._policy.allowed_flags
        if extra:
            raise _Refusal(f"migration flags {flag_names(extra)} not allowed", _PUBLIC_PARAMS)

    def _check_params(self, params: tuple[TypedParam, ...], flags: int, *,
                      prepare: bool) -> tuple[TypedParam, ...]:
        seen: dict[str, TypedParam] = {}
        out: list[TypedParam] = []
        for p in params:
            if p.field in _REFUSED_PARAMS:
                raise _Refusal(f"parameter {p.field} refused: {_REFUSED_PARAMS[p.field]}",
                               _PUBLIC_PARAMS)
            if p.field in _STRING_PARAMS:
                if p.type != PARAM_STRING:
                    raise _Refusal(f"parameter {p.field} must be a string", _PUBLIC_PARAMS)
            elif p.field in _NUMBER_PARAMS:
                if p.type == PARAM_STRING:
                    raise _Refusal(f"parameter {p.field} must be a number", _PUBLIC_PARAMS)
            else:
                raise _Refusal(f"unknown migration parameter {p.field!r} refused", _PUBLIC_PARAMS)
            if p.field in seen and p.field not in _REPEATABLE:
                raise _Refusal(f"parameter {p.field} given twice", _PUBLIC_PARAMS)
            seen[p.field] = p
            if p.field in _XML_PARAMS:
                p = TypedParam(p.field, p.type, self._domain_xml(str(p.value), p.field))
            out.append(p)
        policy = self._policy
        uri = seen.get("migrate_uri")
        if uri is None and prepare:
            raise _Refusal("Prepare3 without migrate_uri refused (B would pick a TCP "
                           "address outside migsec's channel)", _PUBLIC_PARAMS)
        if uri is not None and uri.value != policy.migrate_uri:
            raise _Refusal(f"migrate_uri {uri.value!r} refused (only migsec's socket)",
                           _PUBLIC_PARAMS)
        disks = seen.get("disks_uri")
        if disks is None and prepare and flags & _NON_SHARED:
            raise _Refusal("a disk copy without disks_uri refused (B would open an NBD "
                           "port outside migsec's channel)", _PUBLIC_PARAMS)
        if disks is not None and disks.value != policy.disks_uri:
            raise _Refusal(f"disks_uri {disks.value!r} refused (only migsec's socket)",
                           _PUBLIC_PARAMS)
        dname = seen.get("destination_name")
        if dname is not None and dname.value != policy.domain_name:
            raise _Refusal(f"destination_name {dname.value!r} refused (renaming "
                           f"{policy.domain_name!r} is not allowed)", _PUBLIC_DOMAIN)
        if prepare and "destination_xml" not in seen:
            raise _Refusal("Prepare3 without destination_xml refused", _PUBLIC_XML)
        return tuple(out)

    def _domain_xml(self, xml: str, what: str) -> str:
        """B's rule applied to a domain XML A sent; the result must still be our domain."""
        self._check_identity(xml, what)
        try:
            new = self._policy.rewrite_xml(xml)
        except MigsecError as exc:
            raise _Refusal(f"{what} refused: {exc}", _PUBLIC_XML) from None
        if not isinstance(new, str):
            raise RpcFilterError(f"the rewrite rule returned {type(new).__name__} for {what}")
        self._check_identity(new, f"{what} after the destination's rewrite")
        return new

    def _check_identity(self, xml: str, what: str) -> None:
        root = self._parse(xml.encode("utf-8"), "domain", what)
        self._check_name_uuid(root, what)

    def _check_name_uuid(self, root, what: str) -> None:
        names = [e.text or "" for e in root.findall("name")]
        uuids = [e.text or "" for e in root.findall("uuid")]
        if len(names) != 1 or names[0].strip() != self._policy.domain_name:
            raise _Refusal(f"{what} names domain {names!r}, not {self._policy.domain_name!r}",
                           _PUBLIC_DOMAIN)
        if len(uuids) != 1 or _canonical_uuid(uuids[0]) != self._policy.domain_uuid:
            raise _Refusal(f"{what} has uuid {uuids!r}, not {self._policy.domain_uuid}",
                           _PUBLIC_DOMAIN)

    def _parse(self, data: bytes, root: str, what: str):
        try:
            return safexml.parse_untrusted(data, root=root, what=what,
                                           max_size=self._policy.max_packet, error=MigsecError)
        except MigsecError as exc:
            raise _Refusal(f"{what} refused: {exc}", _PUBLIC_XML) from None

    def _check_cookie(self, cookie: bytes, *, persistent_allowed: bool, required: bool) -> bytes:
        """The cookie checked and, if it carries a persistent definition, rewritten."""
        if not cookie:
            if required:
                raise _Refusal("Prepare3 without a migration cookie refused", _PUBLIC_DOMAIN)
            return cookie
        text = cookie[:-1] if cookie.endswith(b"\0") else cookie   # libvirt sends the NUL
        if b"\0" in text:
            raise _Refusal("migration cookie with an embedded NUL refused", _PUBLIC_DOMAIN)
        root = self._parse(text, "qemu-migration", "migration cookie")
        self._check_name_uuid(root, "migration cookie")
        domains = []
        for child in root:
            tag = child.tag if isinstance(child.tag, str) else None
            if tag is None:
                continue   # comments and processing instructions
            if tag == "network":
                raise _Refusal("migration cookie <network> port data refused (virtual port "
                               "profiles are not migrated by migsec)", _PUBLIC_XML)
            if tag not in _COOKIE_ELEMENTS:
                raise _Refusal(f"unknown migration cookie element <{tag}> refused", _PUBLIC_XML)
            if tag == "domain":
                domains.append(child)
        if not domains:
            return cookie
        if not persistent_allowed:
            raise _Refusal("a persistent definition in the Prepare3 cookie refused", _PUBLIC_XML)
        if len(domains) > 1:
            raise _Refusal("migration cookie with several <domain> definitions refused", _PUBLIC_XML)
        from lxml import etree

        old = domains[0]
        xml = etree.tostring(old, encoding="unicode", with_tail=False)
        new_xml = self._domain_xml(xml, "persistent definition in the Finish3 cookie")
        new = self._parse(new_xml.encode("utf-8"), "domain", "rewritten persistent definition")
        new.tail = old.tail
        root.replace(old, new)
        out = etree.tostring(root, encoding="unicode").encode("utf-8")
        return out + (b"\0" if cookie.endswith(b"\0") else b"")

    def _refuse(self, packet: Packet, name: str, detail: str, public: str, *,
                stream: bool = False) -> Refused:
        h = packet.header
        kind = MessageType.STREAM if stream else MessageType.REPLY
        reply = Header(h.prog, h.vers, h.proc, kind, h.serial, Status.ERROR)
        self._to_client += encode_packet(reply, encode_remote_error(f"migsec: {name} refused: {public}"))
        return Refused(name, h.serial, detail)

    @staticmethod
    def _keepalive(packet: Packet, side: str) -> None:
        h = packet.header
        if (h.vers != KEEPALIVE_PROTOCOL_VERSION or h.type != MessageType.MESSAGE
                or h.status != Status.OK or h.proc not in (KEEPALIVE_PING, KEEPALIVE_PONG)
                or packet.body):
            raise RpcFilterError(f"{side} sent a malformed keepalive message (version {h.vers}, "
                                 f"type {h.type}, procedure {h.proc}, {len(packet.body)}-byte body)")

    # -- server side ---------------------------------------------------------------------------
    def _server_data(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for packet in self._from_server.feed(data):
            event = self._server_packet(packet)
            if event is not None:
                events.append(event)
            self._to_client += packet.raw
        return events

    def _server_packet(self, packet: Packet) -> Event | None:
        h = packet.header
        if h.prog == KEEPALIVE_PROGRAM:
            self._keepalive(packet, "B's libvirtd")
            return None
        if h.prog != REMOTE_PROGRAM or h.type != MessageType.REPLY:
            return None
        proc = self._pending.pop(h.serial, None)
        if proc is None:
            return None
        if proc != h.proc:
            raise RpcFilterError(f"B's libvirtd answered serial {h.serial} with procedure "
                                 f"{h.proc}, the call was {proc}")
        if h.serial == self._close_serial and proc == PROC_CONNECT_CLOSE:
            self._close_answered = True
            return None
        if h.serial == self._prepare_serial and proc == PROC_DOMAIN_MIGRATE_PREPARE3_PARAMS:
            ok, message = self._outcome(packet)
            self._phase = PREPARED if ok else PREPARE_FAILED
            return PrepareDone(ok, message)
        if h.serial == self._finish_serial and proc == PROC_DOMAIN_MIGRATE_FINISH3_PARAMS:
            ok, message = self._outcome(packet)
            self._phase = FINISHED
            return FinishDone(ok, self._finish_cancelled, message)
        return None

    @staticmethod
    def _outcome(packet: Packet) -> tuple[bool, str]:
        if packet.header.status == Status.OK:
            return True, ""
        if packet.header.status == Status.ERROR:
            err = decode_remote_error(packet.body)
            return False, err.message or f"libvirt error code {err.code}"
        raise RpcFilterError(f"B's libvirtd answered a migration call with status "
                             f"{packet.header.status}")


def _type_name(value: int) -> str:
    try:
        return MessageType(value).name
    except ValueError:
        return f"type-{value}"

"""migsec.protocol: the sans-IO migration protocol (no sockets, no asyncio, no libvirt).

Every object here turns bytes into events and events into bytes; the daemon and
the transfer driver own the sockets. Errors are migsec.errors classes (plus the
finer ones in ``migsec.protocol.errors``); an object that raised is in a terminal
ERROR state and refuses further use.

Framing (``migsec.protocol.framing``)
    Frame = type u8 | length u32 BE | payload. ``HEADER_SIZE = 5``.
    ``parse_header(5 bytes) -> (type, length)`` checks the hard maximum for the
    type (RECORD: ``RECORD_MAX`` = 4 MiB + 64; control frames 64 KiB) before any
    allocation (FrameTooLargeError). ``FrameDecoder``: ``receive_data(bytes)``
    (``b""`` = EOF), ``next_frame() -> Frame | NEED_DATA | CLOSED``.
    ``encode_frame(type, payload)``.

Record layer (``migsec.protocol.records``), built from the handshake's SessionKeys
    ``layer = RecordLayer(keys, "source" | "destination")`` - full duplex; the
    source seals with ``keys.a_to_b`` and opens with ``keys.b_to_a``.
    Channels are numbered (u32) and open on first use, one per stream (domain XML,
    each disk, memory image, manifest, later QEMU/NBD byte streams). Per channel:
    DATA/HOLE extents move forward only, nothing follows END.
    Send (each returns one whole frame as bytes):
        send_data(ch, offset, data)        DATA, 1..MAX_DATA bytes (use RECORD_SIZE = 1 MiB)
        seal_data_into(ch, offset, data, out) -> n   bulk path: writes the frame into
                                           a reused buffer of len(data) + OVERHEAD (50)
        send_hole(ch, offset, length)      sparse extent; never send zero bytes
        send_control(ch, dict)             a JSON object (<= 64 KiB)
        send_end(ch, total_length, sha256) stream complete with this digest
        send_ack(ch, offset)               cumulative ack of the PEER's channel ch
        send_close()                       last record of this direction
    Receive (sans-IO): receive_data(bytes) (b"" = connection ended), then
        next_event() -> Data | Hole | Control | End | Ack | Close | NEED_DATA.
    Receive (bulk, blocking driver): read 5 bytes, ``framing.parse_header`` them
        (type must be RECORD), readinto a reused buffer of ``length`` bytes, then
        ``open_record_into(payload_view, out) -> event``; a Data event's ``data``
        is then a memoryview of ``out`` (valid until ``out`` is reused).
    State: acked(ch) (what the peer acknowledged of ours), sent_position(ch),
        received_position(ch), open_channels(), peer_closed, records_sent/received.
    Errors: RecordAuthError (tampered), RecordSequenceError (reordered, dropped,
        duplicated, record after END, ACK beyond what was sent), TruncatedStreamError
        (CLOSE with a channel lacking END, or EOF without CLOSE), FrameTooLargeError,
        NonceExhaustedError (before the per-direction counter reaches its limit),
        MalformedMessageError. The record layer does not hash the data: the sink
        checks End.sha256 against what it wrote.

Replay cache (``migsec.protocol.replay``)
    ``ReplayCache(max_entries=100_000, clock=utc_now)``; ``check(kind, value)``,
    ``add(kind, value, expires_at)`` (ReplayError if seen; ReplayCacheFullError
    when full of live entries: it never forgets a live entry).

SessionKeys (``migsec.protocol.session``)
    frozen: migration_id, a_to_b, b_to_a (32-byte keys, hidden from repr),
    transcript_hash, src_did, dest_did, resume_of; ``keys_for(role)``.

Local exchange, inter-domain handshake and commit messages: see below (filled in
as those modules land: ``local``, ``handshake``, ``commit``).
"""
from migsec.protocol.commit import Decision, Receipt, Resumed, token_hash
from migsec.protocol.framing import NEED_DATA, FrameDecoder, encode_frame, parse_header
from migsec.protocol.handshake import (
    DestinationHandshake,
    MigrationAccepted,
    MigrationProposed,
    MigrationRefused,
    SourceHandshake,
)
from migsec.protocol.local import (
    AuthorizationServer,
    AuthReply,
    AuthRequest,
    CheckedRequest,
    ClientLogin,
    Credentials,
    LocalMigrationRequest,
    make_auth_reply,
    make_migration_request,
)
from migsec.protocol.messages import AuthorizationTicket, MigrationRequest, Obligation
from migsec.protocol.records import Ack, Close, Control, Data, End, Hole, RecordLayer
from migsec.protocol.replay import ReplayCache
from migsec.protocol.session import SessionKeys

__all__ = [
    "NEED_DATA", "FrameDecoder", "encode_frame", "parse_header",
    "AuthRequest", "AuthReply", "ClientLogin", "Credentials", "make_auth_reply",
    "LocalMigrationRequest", "make_migration_request", "AuthorizationServer", "CheckedRequest",
    "MigrationRequest", "AuthorizationTicket", "Obligation",
    "SourceHandshake", "DestinationHandshake", "MigrationProposed", "MigrationAccepted",
    "MigrationRefused", "SessionKeys", "ReplayCache",
    "RecordLayer", "Data", "Hole", "Control", "End", "Ack", "Close",
    "Receipt", "Decision", "Resumed", "token_hash",
]

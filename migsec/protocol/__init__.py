"""migsec.protocol: the sans-IO migration protocol (no sockets, no asyncio, no libvirt).

Every object here turns bytes into events and events into bytes; the daemon and
the transfer driver own the sockets. Errors are migsec.errors classes (plus the
finer ones in ``migsec.protocol.errors``); a state machine (handshake, record
layer) that raised is in a terminal ERROR state and refuses further use.

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
    Threads: one thread may send while another receives (the two directions keep
        separate state); calls within one direction must be serialized by the caller.
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

Messages (``migsec.protocol.messages``; strict decoders raise MalformedMessageError)
    ``MigrationRequest(vm, mode "cold"|"live", dest_did, storage_map={src: dst},
    network_map={src: dst}, options={str: str|int|bool})``; ``.claims()``, ``.digest()``
    (SHA-256 of canonical JSON), ``MigrationRequest.from_claims(obj)``.
    ``Obligation(id, attributes)``. ``AuthorizationTicket(src_did, dest_did, user_id, vm,
    request_digest, nonce4, issued_at, expires_at, obligations)``: ``.sign(key) -> JWS``,
    ``AuthorizationTicket.verify(token, verifying_key, now=)`` (TicketTamperedError,
    TicketExpiredError), ``.peek(token)`` (unverified). All times are aware UTC datetimes.

Local exchange (``migsec.protocol.local``; each message has ``encode() -> bytes``,
``decode(bytes)`` and ``FRAME_TYPE`` for ``encode_frame``)
    MC: ``login = ClientLogin(user_id, ssh=False, clock=)``; send ``login.request``
        (AuthRequest; ssh users: ``login.sign_with(agent_sign)`` first);
        ``creds = login.finish(AuthReply, password=...)`` -> Credentials(user_id, sk2,
        ticket, expires_at) (AuthenticationError on a wrong password / foreign reply);
        ``make_migration_request(creds, MigrationRequest) -> LocalMigrationRequest``.
    AS: ``make_auth_reply(AuthRequest, sk3=, password_key=<.key .salt .n .r .p> |
        ssh_verify=callable(payload, signature), lifetime=, clock=) -> AuthReply``.
        SK1 is the stored scrypt verifier key; the reply is sealed under
        HKDF(SK1, Nonce1) (ssh users: HKDF(X25519 ECDH)).
    AZ: ``az = AuthorizationServer(did=, key=SigningKey, sk3=, replay_cache=, clock=)``;
        ``checked = az.open_request(LocalMigrationRequest)`` -> CheckedRequest(user_id,
        request, nonce3, ticket_expires_at) after SK3/SK2, expiry, same-UserID and replay
        checks (TicketTamperedError, TicketExpiredError, ReplayError, AuthenticationError);
        ask the PDP; then ``ticket, token = az.issue(checked, obligations=[...])``.
        One Auth_Tkt authorizes one MigrationRequest (its Nonce2 enters the replay cache).

Inter-domain handshake (``migsec.protocol.handshake``); identity = pki.DomainIdentity,
trust = pki.TrustStore
    A: ``hs = SourceHandshake(identity, trust, peer_did=, peer_cert_pem=, clock=)``;
        ``frame = hs.initiate(request, authr_tkt_token, migration_id=None, resume_of=None)``;
        then ``hs.receive_data(bytes)``; ``hs.next_event()`` -> MigrationAccepted(keys,
        peer, signed_response) | MigrationRefused(migration_id, reason, ...) | NEED_DATA.
        ``hs.migration_id`` and ``hs.signed_request`` (A's JWS of the MigReq body, read-only,
        for A's ledger) are set by initiate. A re-verifies Cert_B only if it differs from
        ``peer_cert_pem``.
    B: ``hs = DestinationHandshake(identity, trust, replay_cache=, clock=)``;
        ``hs.receive_data(bytes)``; ``hs.next_event()`` -> MigrationProposed(migration_id,
        resume_of, src_did, user_id, request, authorization, authorization_token, peer,
        signed_request) | NEED_DATA. Run policy + capacity, then ``hs.accept() -> frame``
        (``hs.keys`` set; ``hs.signed_response`` for the ledger) or ``hs.refuse(reason)``.
    In DECIDING / DONE / REFUSED ``next_event()`` returns NEED_DATA and leaves further
    bytes alone; after DONE, ``hs.trailing_data()`` returns bytes already received past
    the handshake: feed them to the RecordLayer. ``hs.state`` in IDLE / AWAITING_* /
    DECIDING / DONE / REFUSED / ERROR; illegal moves raise UnexpectedMessageError.
    Refusals: UnknownIssuerError, CertificateExpiredError, DidMismatchError,
    CertificateRevokedError, KeyUsageError (from the TrustStore), TicketTamperedError,
    TicketExpiredError (Authr_Tkt or message time outside ``TIME_WINDOW`` = 2 min),
    ReplayError (NonceA), KeyBindingError (signature does not bind the body / eA / eB /
    H(MigReq)), ReflectionError (our own kind of message or domain), HandshakeError,
    MalformedMessageError. Keys: HKDF-SHA-256(X25519(eA, eB), salt = transcript hash,
    info = migration id + DIDs) -> a_to_b || b_to_a.

Commit messages (``migsec.protocol.commit``; compact JWS, store them in the ledger)
    ``Receipt(migration_id, src_did, dest_did, streams={name: sha256}, transcript_hash,
    issued_at)`` signed by B; ``Decision(..., decision "commit"|"abort", issued_at,
    receipt_hash=token_hash(receipt_token), reason=None)`` signed by A;
    ``Resumed(..., decision_hash=token_hash(decision_token), issued_at)`` signed by B.
    ``.sign(key) -> token``; ``Cls.verify(token, verifying_key, migration_id=None)``;
    ``Cls.peek(token)`` unverified. Carry them as CONTROL records
    ``{"t": "receipt"|"decision"|"resumed", "jws": token}``.

libvirt RPC filter (``migsec.protocol.libvirt_rpc``; XDR in ``migsec.protocol.xdr``)
    B's proxy for the dconn of a p2p live migration: ``RpcFilter(RpcPolicy(...))``,
    ``client_data``/``server_data(bytes) -> [Forwarded|Refused|PrepareDone|FinishDone]``,
    ``data_to_server()``, ``data_to_client()``, ``state``, ``close_answered``. Malformed or
    oversize packets raise RpcFilterError and leave it in a terminal error state. Imported
    on its own (not re-exported here) so the handshake users do not load lxml.
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

"""Random and mutated bytes fed to every decoder raise only migsec's own errors."""
from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migsec.errors import MigsecError
from migsec.protocol.codec import parse_json_object
from migsec.protocol.commit import Decision, Receipt, Resumed
from migsec.protocol.framing import HEADER_SIZE, MIG_REQ, MIG_RESP, NEED_DATA, FrameDecoder, encode_frame
from migsec.protocol.handshake import DestinationHandshake, SourceHandshake
from migsec.crypto import scrypt_key
from migsec.protocol.local import (
    AuthorizationServer,
    AuthReply,
    AuthRequest,
    ClientLogin,
    LocalMigrationRequest,
    make_auth_reply,
    make_migration_request,
)
from migsec.protocol.messages import AuthorizationTicket, MigrationRequest
from migsec.protocol.records import RecordLayer
from migsec.protocol.replay import ReplayCache
from migsec.protocol.session import SessionKeys

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
B_DID = "cloud-b.example"
NOW = datetime.now(timezone.utc)


@st.composite
def mutated(draw, seed: bytes):
    """A valid message with a few bytes flipped, cut, or inserted."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut" and data:
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i:]
    return bytes(data)


def only_migsec_errors(fn, data):
    try:
        fn(data)
    except MigsecError:
        pass


def _seeds():
    login = ClientLogin("alice")
    sk3 = os.urandom(32)

    class Key:
        key, salt, n, r, p = os.urandom(32), os.urandom(16), 2**10, 8, 1

    reply = make_auth_reply(login.request, sk3=sk3, password_key=Key)
    req = MigrationRequest(vm="vm", mode="cold", dest_did=B_DID, storage_map={"/a": "/b"}, options={"x": 1})
    return login.request.encode(), reply.encode(), req


AUTH_REQ, AUTH_REPLY, REQ = _seeds()


class PASSWORD_KEY:  # a real scrypt verifier at a tiny cost, so the MC can open its reply
    salt, n, r, p = bytes(range(16)), 2**4, 1, 1
    key = scrypt_key("pw", bytes(range(16)), n=2**4, r=1, p=1)


SK3 = os.urandom(32)
LOGIN = ClientLogin("alice")
DECODERS = {
    "AuthRequest": AuthRequest.decode,
    "AuthReply": AuthReply.decode,
    "LocalMigrationRequest": LocalMigrationRequest.decode,
    "MigrationRequest": lambda d: MigrationRequest.from_claims(parse_json_object(d, "x")),
    "AuthorizationTicket": lambda d: AuthorizationTicket.peek(d.decode("latin-1")),
    "Receipt": lambda d: Receipt.peek(d.decode("latin-1")),
    "Decision": lambda d: Decision.peek(d.decode("latin-1")),
    "Resumed": lambda d: Resumed.peek(d.decode("latin-1")),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_to_message_decoders(name, data):
    only_migsec_errors(DECODERS[name], data)


@FUZZ
@given(data=st.one_of(mutated(AUTH_REQ), mutated(AUTH_REPLY)))
def test_mutated_local_messages(data):
    only_migsec_errors(AuthRequest.decode, data)
    only_migsec_errors(AuthReply.decode, data)


@FUZZ
@given(data=st.data())
def test_mutated_signed_tokens(pki, data):
    ticket = AuthorizationTicket(src_did=pki.a.did, dest_did=B_DID, user_id="u", vm="vm",
                                 request_digest=REQ.digest(), nonce4=bytes(16), issued_at=NOW,
                                 expires_at=NOW + timedelta(minutes=5)).sign(pki.a.key)
    blob = data.draw(mutated(ticket.encode()))
    text = blob.decode("latin-1")
    only_migsec_errors(lambda t: AuthorizationTicket.verify(t, pki.a.public_key, now=NOW), text)
    only_migsec_errors(lambda t: Receipt.verify(t, pki.a.public_key), text)


def _drain(machine):
    while machine.next_event() is not NEED_DATA:
        pass


@FUZZ
@given(data=st.data())
def test_mutated_mig_req_and_mig_resp(pki, data):
    # one instant for the ticket and both handshakes, taken after the certificates were issued
    # (a module-level time would be older than them, or too old for the ticket, in a long run)
    now = datetime.now(timezone.utc)
    clock = lambda: now  # noqa: E731
    src = SourceHandshake(pki.a, pki.trust, peer_did=B_DID, peer_cert_pem=pki.b.cert_pem, clock=clock)
    dst = DestinationHandshake(pki.b, pki.trust, replay_cache=ReplayCache(), clock=clock)
    token = AuthorizationTicket(src_did=pki.a.did, dest_did=B_DID, user_id="u", vm="vm",
                                request_digest=REQ.digest(), nonce4=bytes(16), issued_at=now,
                                expires_at=now + timedelta(minutes=5)).sign(pki.a.key)
    req = src.initiate(REQ, token)
    bad_req = data.draw(st.one_of(mutated(req[HEADER_SIZE:]).map(lambda p: encode_frame(MIG_REQ, p)),
                                  mutated(req)))
    dst2 = DestinationHandshake(pki.b, pki.trust, replay_cache=ReplayCache(), clock=clock)
    only_migsec_errors(lambda d: (dst2.receive_data(d), _drain(dst2)), bad_req)
    dst.receive_data(req)
    dst.next_event()
    resp = dst.accept()
    bad_resp = data.draw(mutated(resp[HEADER_SIZE:]).map(lambda p: encode_frame(MIG_RESP, p)))
    only_migsec_errors(lambda d: (src.receive_data(d), _drain(src)), bad_resp)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_to_handshakes(pki, data):
    dst = DestinationHandshake(pki.b, pki.trust, replay_cache=ReplayCache())
    only_migsec_errors(lambda d: (dst.receive_data(d), _drain(dst)), data)
    only_migsec_errors(lambda d: (dst.receive_data(d), _drain(dst)), encode_frame(MIG_REQ, data))


KEYS = SessionKeys("m", os.urandom(32), os.urandom(32), os.urandom(32), "a.example", "b.example")


@FUZZ
@given(data=st.data())
def test_random_and_mutated_records(data):
    src = RecordLayer(KEYS, "source")
    wire = (src.send_data(1, 0, b"abc") + src.send_hole(1, 3, 9) + src.send_control(2, {"a": [1, 2]})
            + src.send_end(1, 12, bytes(32)) + src.send_end(2, 0, bytes(32)) + src.send_close())
    blob = data.draw(st.one_of(st.binary(max_size=400), mutated(wire)))
    dst = RecordLayer(KEYS, "destination")
    only_migsec_errors(lambda d: (dst.receive_data(d), dst.receive_data(b""), _drain(dst)), blob)
    dst2 = RecordLayer(KEYS, "destination")
    only_migsec_errors(lambda d: dst2.open_record_into(d, bytearray(len(d))), blob[HEADER_SIZE:])


@FUZZ
@given(data=st.binary(max_size=200))
def test_frame_decoder(data):
    dec = FrameDecoder()
    def run(d):
        dec.receive_data(d)
        dec.receive_data(b"")
        while dec.next_frame() is not NEED_DATA and dec.buffered:
            pass
    only_migsec_errors(run, data)


@FUZZ
@given(data=st.data())
def test_mutated_sealed_local_messages_through_mc_and_az(pki, data):
    """Mutations that survive the outer decoders reach the MC's and the AZ's sealed-part checks."""
    reply = make_auth_reply(LOGIN.request, sk3=SK3, password_key=PASSWORD_KEY)
    bad_reply = data.draw(mutated(reply.encode()))
    only_migsec_errors(lambda d: LOGIN.finish(AuthReply.decode(d), password="pw"), bad_reply)
    creds = LOGIN.finish(reply, password="pw")
    az = AuthorizationServer(did=pki.a.did, key=pki.a.key, sk3=SK3, replay_cache=ReplayCache())
    bad = data.draw(mutated(make_migration_request(creds, REQ).encode()))
    only_migsec_errors(lambda d: az.open_request(LocalMigrationRequest.decode(d)), bad)

"""The two-message inter-domain handshake between real SourceHandshake / DestinationHandshake
objects with certificates from migsec.pki, then the record layer on the keys they derived."""
from __future__ import annotations

import base64
import json
import os

import pytest

from migsec.crypto.envelope import jwe_decrypt, jwe_encrypt, jws_sign, jws_verify
from migsec.errors import (
    CertificateExpiredError,
    DidMismatchError,
    HandshakeError,
    ReplayError,
    TicketExpiredError,
    TicketTamperedError,
    UnexpectedMessageError,
    UnknownIssuerError,
)
from migsec.protocol.errors import KeyBindingError, ReflectionError
from migsec.protocol.framing import HEADER_SIZE, MIG_REQ, MIG_RESP, NEED_DATA, encode_frame
from migsec.protocol.handshake import (
    DONE,
    ERROR,
    REFUSED,
    DestinationHandshake,
    MigrationAccepted,
    MigrationProposed,
    MigrationRefused,
    SourceHandshake,
)
from migsec.protocol.messages import AuthorizationTicket, MigrationRequest
from migsec.protocol.records import Data, RecordLayer
from migsec.protocol.replay import ReplayCache

A_DID, B_DID = "cloud-a.example", "cloud-b.example"  # the DIDs of the pki fixture
REQUEST = MigrationRequest(vm="db-7", mode="live", dest_did=B_DID, storage_map={"/img/db.qcow2": "/srv/db.qcow2"})


def authr_tkt(identity, clock, *, request=REQUEST, lifetime=600, user="alice", dest=B_DID):
    now = clock()
    from datetime import timedelta
    return AuthorizationTicket(src_did=identity.did, dest_did=dest, user_id=user, vm=request.vm,
                               request_digest=request.digest(), nonce4=os.urandom(16), issued_at=now,
                               expires_at=now + timedelta(seconds=lifetime)).sign(identity.key)


def pair(pki, clock, replay_cache, *, a=None, b=None, trust_a=None, trust_b=None):
    src = SourceHandshake(a or pki.a, trust_a or pki.trust, peer_did=B_DID, peer_cert_pem=pki.b.cert_pem, clock=clock)
    dst = DestinationHandshake(b or pki.b, trust_b or pki.trust, replay_cache=replay_cache, clock=clock)
    return src, dst


def deliver(frame: bytes, to):
    to.receive_data(frame)
    return to.next_event()


def test_handshake_then_records(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    token = authr_tkt(pki.a, clock)
    assert src.signed_request is None
    proposed = deliver(src.initiate(REQUEST, token), dst)
    assert isinstance(proposed, MigrationProposed)
    assert (proposed.src_did, proposed.user_id, proposed.request) == (A_DID, "alice", REQUEST)
    assert proposed.peer.did == A_DID and proposed.authorization.request_digest == REQUEST.digest()
    assert dst.keys is None  # nothing derived before the caller's policy said yes
    resp = dst.accept()
    # B's first record may ride in the same TCP segment as MigResp
    b_records = RecordLayer(dst.keys, "destination")
    accepted = deliver(resp + b_records.send_control(0, {"ready": True}), src)
    assert isinstance(accepted, MigrationAccepted)
    assert src.state == dst.state == DONE
    assert accepted.keys == dst.keys and accepted.keys.migration_id == proposed.migration_id
    assert accepted.keys.a_to_b != accepted.keys.b_to_a

    # the JWS A keeps for its ledger is exactly the body B received, and verifies with A's key
    assert proposed.signed_request == src.signed_request
    assert jws_verify(src.signed_request, pki.a.public_key)["mid"] == proposed.migration_id
    with pytest.raises(AttributeError):
        src.signed_request = "forged"  # read-only
    assert src.next_event() is NEED_DATA  # the record that followed is left for the record layer
    a_records = RecordLayer(accepted.keys, "source")
    a_records.receive_data(src.trailing_data())
    assert a_records.next_event().message == {"ready": True}
    b_records.receive_data(a_records.send_data(4, 0, b"disk bytes"))
    assert b_records.next_event() == Data(4, 0, b"disk bytes")


def test_each_handshake_has_fresh_keys(pki, clock, replay_cache):
    keys = []
    for _ in range(2):
        src, dst = pair(pki, clock, replay_cache)
        deliver(src.initiate(REQUEST, authr_tkt(pki.a, clock)), dst)
        keys.append(deliver(dst.accept(), src).keys)
    assert keys[0].a_to_b != keys[1].a_to_b and keys[0].transcript_hash != keys[1].transcript_hash


def test_resume_names_the_migration(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    proposed = deliver(src.initiate(REQUEST, authr_tkt(pki.a, clock), migration_id="m-2", resume_of="m-1"), dst)
    assert (proposed.migration_id, proposed.resume_of) == ("m-2", "m-1")
    assert deliver(dst.accept(), src).keys.resume_of == "m-1"


def test_nack_is_signed_and_gives_no_keys(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    deliver(src.initiate(REQUEST, authr_tkt(pki.a, clock)), dst)
    refused = deliver(dst.refuse("not enough memory for db-7"), src)
    assert isinstance(refused, MigrationRefused) and refused.reason == "not enough memory for db-7"
    assert src.state == dst.state == REFUSED and src.keys is None and dst.keys is None


def expect_refusal(dst, frame, exc):
    dst.receive_data(frame)
    with pytest.raises(exc):
        dst.next_event()
    assert dst.state == ERROR and dst.keys is None
    with pytest.raises(UnexpectedMessageError):
        dst.accept()


def test_unknown_ca(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache, a=pki.rogue_a)
    expect_refusal(dst, src.initiate(REQUEST, authr_tkt(pki.rogue_a, clock)), UnknownIssuerError)


def test_expired_certificate(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache, a=pki.expired_a)
    expect_refusal(dst, src.initiate(REQUEST, authr_tkt(pki.expired_a, clock)), CertificateExpiredError)


def test_source_refuses_an_expired_destination_certificate(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    deliver(src.initiate(REQUEST, authr_tkt(pki.a, clock)), dst)
    resp = dst.accept()
    clock.advance(days=400)  # B's certificate (365 days) has expired by now
    src.receive_data(resp)
    with pytest.raises(CertificateExpiredError):
        src.next_event()
    assert src.state == ERROR and src.keys is None


def test_source_refuses_a_destination_from_an_unknown_ca(pki, clock, tmp_path):
    from migsec.pki import CertificateAuthority, DomainIdentity

    rogue = CertificateAuthority.create(tmp_path / "rogue", "rogue CA")
    rogue.issue_domain(B_DID, tmp_path / "rogue-b")
    fake_b = DomainIdentity.load(tmp_path / "rogue-b" / "domain-key.pem", tmp_path / "rogue-b" / "domain-cert.pem")
    src = SourceHandshake(pki.a, pki.trust, peer_did=B_DID, peer_cert_pem=fake_b.cert_pem, clock=clock)
    with pytest.raises(UnknownIssuerError):
        src.initiate(REQUEST, authr_tkt(pki.a, clock))
    assert src.state == ERROR and src.keys is None


def test_did_mismatch_wrong_destination(pki, clock, replay_cache):
    """A MigReq meant for B, delivered to C (also trusted): refused, not decrypted by C's policy."""
    src, _ = pair(pki, clock, replay_cache)
    other = DestinationHandshake(pki.other, pki.trust, replay_cache=replay_cache, clock=clock)
    other.receive_data(src.initiate(REQUEST, authr_tkt(pki.a, clock)))
    with pytest.raises(HandshakeError):  # not encrypted to C's key
        other.next_event()


def test_did_mismatch_claimed_source(pki, clock, replay_cache):
    """C (trusted) signs a MigReq claiming to come from A: the certificate's DID decides."""
    src = SourceHandshake(pki.other, pki.trust, peer_did=B_DID, peer_cert_pem=pki.b.cert_pem, clock=clock)
    src._identity = type("Liar", (), {"did": A_DID, "key": pki.other.key, "cert_pem": pki.other.cert_pem})()
    _, dst = pair(pki, clock, replay_cache)
    token = authr_tkt(src._identity, clock)
    expect_refusal(dst, src.initiate(REQUEST, token), DidMismatchError)


def test_source_refuses_a_peer_certificate_for_another_did(pki, clock):
    src = SourceHandshake(pki.a, pki.trust, peer_did=B_DID, peer_cert_pem=pki.other.cert_pem, clock=clock)
    with pytest.raises(DidMismatchError):
        src.initiate(REQUEST, authr_tkt(pki.a, clock))
    assert src.state == ERROR


def test_tampered_authorization_ticket(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    frame = src.initiate(REQUEST, authr_tkt(pki.a, clock))
    body = json.loads(frame[HEADER_SIZE:])
    head, claims, sig = body["authr_tkt"].split(".")
    c = json.loads(base64.urlsafe_b64decode(claims + "=="))
    c["vm"] = "another-vm"  # widen the ticket
    body["authr_tkt"] = ".".join([head, base64.urlsafe_b64encode(json.dumps(c).encode()).rstrip(b"=").decode(), sig])
    expect_refusal(dst, encode_frame(MIG_REQ, json.dumps(body).encode()), TicketTamperedError)


def test_ticket_for_another_request(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    other = MigrationRequest(vm="db-7", mode="cold", dest_did=B_DID)  # same VM, other request
    src_frame = src.initiate(REQUEST, authr_tkt(pki.a, clock))
    body = json.loads(src_frame[HEADER_SIZE:])
    body["authr_tkt"] = authr_tkt(pki.a, clock, request=other)
    expect_refusal(dst, encode_frame(MIG_REQ, json.dumps(body).encode()), TicketTamperedError)


def test_expired_authorization_ticket(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    token = authr_tkt(pki.a, clock, lifetime=60)
    clock.advance(seconds=61)
    expect_refusal(dst, src.initiate(REQUEST, token), TicketExpiredError)


def test_stale_mig_req(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    frame = src.initiate(REQUEST, authr_tkt(pki.a, clock, lifetime=3600))
    clock.advance(minutes=5)
    expect_refusal(dst, frame, TicketExpiredError)


def test_replayed_mig_req(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    frame = src.initiate(REQUEST, authr_tkt(pki.a, clock))
    assert isinstance(deliver(frame, dst), MigrationProposed)
    _, dst2 = pair(pki, clock, replay_cache)  # a new connection to B, same replay cache
    expect_refusal(dst2, frame, ReplayError)


def _reseal_req(frame: bytes, pki, mutate) -> bytes:
    """A man in the middle with the (impossible) power to read MigReq: change the signed body."""
    body = json.loads(frame[HEADER_SIZE:])
    jws = jwe_decrypt(body["body"], pki.b.key).decode()
    head, claims, sig = jws.split(".")
    c = json.loads(base64.urlsafe_b64decode(claims + "=="))
    mutate(c)
    claims = base64.urlsafe_b64encode(json.dumps(c).encode()).rstrip(b"=").decode()
    body["body"] = jwe_encrypt(".".join([head, claims, sig]).encode(), pki.b.public_key)
    return encode_frame(MIG_REQ, json.dumps(body).encode())


def test_substituted_ea_is_refused(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    frame = src.initiate(REQUEST, authr_tkt(pki.a, clock))
    mitm_ea = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    expect_refusal(dst, _reseal_req(frame, pki, lambda c: c.update(ea=mitm_ea)), KeyBindingError)


def test_mitm_resigning_with_its_own_trusted_key_is_refused(pki, clock, replay_cache):
    """The MITM re-signs the body with C's key but keeps Cert_A."""
    src, dst = pair(pki, clock, replay_cache)
    frame = src.initiate(REQUEST, authr_tkt(pki.a, clock))
    body = json.loads(frame[HEADER_SIZE:])
    jws = jwe_decrypt(body["body"], pki.b.key).decode()
    c = json.loads(base64.urlsafe_b64decode(jws.split(".")[1] + "=="))
    c["ea"] = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    forged = jws_sign(c, pki.other.key, typ="migsec-migreq+jwt")
    body["body"] = jwe_encrypt(forged.encode(), pki.b.public_key)
    expect_refusal(dst, encode_frame(MIG_REQ, json.dumps(body).encode()), KeyBindingError)


def test_substituted_eb_is_refused(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    deliver(src.initiate(REQUEST, authr_tkt(pki.a, clock)), dst)
    resp = dst.accept()
    body = json.loads(resp[HEADER_SIZE:])
    head, claims, sig = jwe_decrypt(body["body"], pki.a.key).decode().split(".")
    c = json.loads(base64.urlsafe_b64decode(claims + "=="))
    c["eb"] = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    claims = base64.urlsafe_b64encode(json.dumps(c).encode()).rstrip(b"=").decode()
    body["body"] = jwe_encrypt(".".join([head, claims, sig]).encode(), pki.a.public_key)
    src.receive_data(encode_frame(MIG_RESP, json.dumps(body).encode()))
    with pytest.raises(KeyBindingError):
        src.next_event()
    assert src.state == ERROR and src.keys is None


def test_response_to_another_request_is_refused(pki, clock, replay_cache):
    """B's genuine answer to one MigReq spliced onto another A session."""
    src1, dst1 = pair(pki, clock, replay_cache)
    src2, dst2 = pair(pki, clock, replay_cache)
    deliver(src1.initiate(REQUEST, authr_tkt(pki.a, clock)), dst1)
    src2.initiate(REQUEST, authr_tkt(pki.a, clock))
    src2.receive_data(dst1.accept())
    with pytest.raises(KeyBindingError):
        src2.next_event()


def test_reflected_mig_resp_to_destination(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    deliver(src.initiate(REQUEST, authr_tkt(pki.a, clock)), dst)
    resp = dst.accept()
    _, dst2 = pair(pki, clock, replay_cache)
    expect_refusal(dst2, resp, ReflectionError)


def test_reflected_mig_resp_relabelled_as_mig_req(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    deliver(src.initiate(REQUEST, authr_tkt(pki.a, clock)), dst)
    body = json.loads(dst.accept()[HEADER_SIZE:])
    body.update(t="mig-req", authr_tkt=authr_tkt(pki.a, clock))
    # it still carries B's own certificate
    _, dst2 = pair(pki, clock, replay_cache)
    expect_refusal(dst2, encode_frame(MIG_REQ, json.dumps(body).encode()), ReflectionError)


def test_reflected_mig_req_to_source(pki, clock, replay_cache):
    src, _ = pair(pki, clock, replay_cache)
    frame = src.initiate(REQUEST, authr_tkt(pki.a, clock))
    src.receive_data(frame)
    with pytest.raises(ReflectionError):
        src.next_event()
    assert src.state == ERROR and src.keys is None


def test_mig_req_from_own_domain_is_reflection(pki, clock, replay_cache):
    """B's own MigReq (B as a source to A) fed back to B."""
    b_as_source = SourceHandshake(pki.b, pki.trust, peer_did=A_DID, peer_cert_pem=pki.a.cert_pem, clock=clock)
    req = MigrationRequest(vm="x", mode="cold", dest_did=A_DID)
    frame = b_as_source.initiate(req, authr_tkt(pki.b, clock, request=req, dest=A_DID))
    _, dst = pair(pki, clock, replay_cache)
    expect_refusal(dst, frame, ReflectionError)


def test_illegal_moves_enter_error(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    with pytest.raises(UnexpectedMessageError):
        dst.accept()  # nothing proposed yet
    assert dst.state == ERROR
    with pytest.raises(UnexpectedMessageError):
        dst.receive_data(b"x")
    token = authr_tkt(pki.a, clock)
    src.initiate(REQUEST, token)
    with pytest.raises(UnexpectedMessageError):
        src.initiate(REQUEST, token)
    assert src.state == ERROR


def test_second_answer_is_illegal(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    deliver(src.initiate(REQUEST, authr_tkt(pki.a, clock)), dst)
    dst.accept()
    with pytest.raises(UnexpectedMessageError):
        dst.refuse("changed my mind")
    assert dst.state == ERROR


def test_connection_closed_mid_handshake(pki, clock, replay_cache):
    src, _ = pair(pki, clock, replay_cache)
    src.initiate(REQUEST, authr_tkt(pki.a, clock))
    src.receive_data(b"")
    with pytest.raises(HandshakeError, match="closed"):
        src.next_event()
    assert src.state == ERROR


def test_need_data_until_whole_frame(pki, clock, replay_cache):
    src, dst = pair(pki, clock, replay_cache)
    frame = src.initiate(REQUEST, authr_tkt(pki.a, clock))
    dst.receive_data(frame[:100])
    assert dst.next_event() is NEED_DATA
    dst.receive_data(frame[100:])
    assert isinstance(dst.next_event(), MigrationProposed)


def test_replay_cache_bounds(clock):
    cache = ReplayCache(max_entries=2, clock=clock)
    from datetime import timedelta
    cache.add("n", b"1", clock() + timedelta(seconds=10))
    cache.add("n", b"2", clock() + timedelta(seconds=20))
    from migsec.protocol.errors import ReplayCacheFullError
    with pytest.raises(ReplayCacheFullError):
        cache.add("n", b"3", clock() + timedelta(seconds=10))
    with pytest.raises(ReplayError):
        cache.add("n", b"1", clock() + timedelta(seconds=10))
    clock.advance(seconds=11)  # b"1" expired and is forgotten
    cache.add("n", b"3", clock() + timedelta(seconds=10))
    assert len(cache) == 2 and not cache.seen("n", b"1") and cache.seen("n", b"2")


def test_revoked_certificate(pki, clock, replay_cache, tmp_path):
    from migsec.errors import CertificateRevokedError
    from migsec.pki import DomainIdentity, TrustStore

    pki.ca.issue_domain(A_DID, tmp_path / "revoked-a")
    revoked = DomainIdentity.load(tmp_path / "revoked-a" / "domain-key.pem", tmp_path / "revoked-a" / "domain-cert.pem")
    pki.ca.revoke(revoked.cert_pem)
    crl = pki.ca.write_crl(tmp_path / "crl.pem")
    trust_with_crl = TrustStore.from_files([pki.ca.directory / "ca-cert.pem"], [crl])
    src, dst = pair(pki, clock, replay_cache, a=revoked, trust_b=trust_with_crl)
    expect_refusal(dst, src.initiate(REQUEST, authr_tkt(revoked, clock)), CertificateRevokedError)
    # the same B accepts A's unrevoked certificate
    src, dst = pair(pki, clock, replay_cache, trust_b=trust_with_crl)
    assert isinstance(deliver(src.initiate(REQUEST, authr_tkt(pki.a, clock)), dst), MigrationProposed)

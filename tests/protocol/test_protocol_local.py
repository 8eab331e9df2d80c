"""The local exchange MC -> AS -> MC -> AZ, every message through its encoder and decoder."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import pytest

from migsec.crypto import SigningKey, scrypt_key
from migsec.errors import (
    AuthenticationError,
    MalformedMessageError,
    ReplayError,
    SignatureError,
    TicketExpiredError,
    TicketTamperedError,
)
from migsec.protocol.local import (
    AuthorizationServer,
    AuthReply,
    AuthRequest,
    ClientLogin,
    LocalMigrationRequest,
    make_auth_reply,
    make_migration_request,
)
from migsec.protocol.messages import AuthorizationTicket, MigrationRequest, Obligation

A_DID, B_DID = "cloud-a.example", "cloud-b.example"  # the DIDs of the pki fixture


@dataclass
class PasswordKey:
    key: bytes
    salt: bytes
    n: int = 2**10  # small for tests; the user database picks the real cost
    r: int = 8
    p: int = 1


def user_key(password: str) -> PasswordKey:
    salt = os.urandom(16)
    return PasswordKey(key=scrypt_key(password, salt, n=2**10), salt=salt)


REQUEST = MigrationRequest(vm="web-01", mode="cold", dest_did=B_DID,
                           storage_map={"/var/lib/libvirt/images/web.qcow2": "/srv/vm/web.qcow2"},
                           network_map={"default": "br-ext"}, options={"bandwidth_mbps": 500, "verify": True})


@pytest.fixture
def world(pki, clock, replay_cache):
    sk3 = os.urandom(32)
    az = AuthorizationServer(did=A_DID, key=pki.a.key, sk3=sk3, replay_cache=replay_cache, clock=clock)
    return sk3, az


def login(sk3, clock, password="correct horse", typed=None):
    pk = user_key(password)
    mc = ClientLogin("alice", clock=clock)
    req = AuthRequest.decode(mc.request.encode())
    reply = AuthReply.decode(make_auth_reply(req, sk3=sk3, password_key=pk, clock=clock).encode())
    return mc.finish(reply, password=typed or password)


def send(creds, clock, request=REQUEST):
    return LocalMigrationRequest.decode(make_migration_request(creds, request, clock=clock).encode())


def test_whole_local_exchange(pki, clock, world):
    sk3, az = world
    creds = login(sk3, clock)
    checked = az.open_request(send(creds, clock))
    assert checked.user_id == "alice" and checked.request == REQUEST
    ticket, token = az.issue(checked, obligations=[Obligation("urn:migsec:obligation:max-bandwidth", {"mbps": 500})])
    # the Authr_Tkt is a plain JWS any holder of A's certificate can check
    verified = AuthorizationTicket.verify(token, pki.a.public_key, now=clock())
    assert verified == ticket
    assert (verified.src_did, verified.dest_did, verified.user_id, verified.vm) == (A_DID, B_DID, "alice", "web-01")
    assert verified.request_digest == REQUEST.digest()
    assert verified.obligations[0].attributes["mbps"] == 500
    with pytest.raises(TicketTamperedError):
        AuthorizationTicket.verify(token, pki.b.public_key, now=clock())


def test_ssh_agent_login(clock, world):
    sk3, az = world
    agent_key = SigningKey.generate("ed25519")  # stands in for the key an ssh-agent holds
    mc = ClientLogin("bob", ssh=True, clock=clock)
    mc.sign_with(agent_key.sign)
    req = AuthRequest.decode(mc.request.encode())

    def ssh_verify(payload: bytes, signature: bytes) -> None:
        try:
            agent_key.public_key.verify(signature, payload)
        except SignatureError as exc:
            raise AuthenticationError("bad ssh signature") from exc

    reply = AuthReply.decode(make_auth_reply(req, sk3=sk3, ssh_verify=ssh_verify, clock=clock).encode())
    creds = mc.finish(reply)
    assert az.open_request(send(creds, clock)).user_id == "bob"
    forged = req.with_signature(SigningKey.generate("ed25519").sign(req.signing_payload()))
    with pytest.raises(AuthenticationError):
        make_auth_reply(forged, sk3=sk3, ssh_verify=ssh_verify, clock=clock)


def test_wrong_password(world, clock):
    sk3, _ = world
    with pytest.raises(AuthenticationError, match="wrong password"):
        login(sk3, clock, typed="wrong")


def test_reply_to_another_request_is_refused(world, clock):
    sk3, _ = world
    pk = user_key("pw")
    first, second = ClientLogin("alice", clock=clock), ClientLogin("alice", clock=clock)
    reply = make_auth_reply(first.request, sk3=sk3, password_key=pk, clock=clock)
    with pytest.raises(AuthenticationError):  # sealed under a key bound to the first Nonce1
        second.finish(reply, password="pw")


def test_tampered_auth_ticket(world, clock):
    sk3, az = world
    msg = send(login(sk3, clock), clock)
    head, key, iv, ct, tag = msg.ticket.split(".")
    flipped = ct[:-2] + ("A" if ct[-2] != "A" else "B") + ct[-1]
    with pytest.raises(TicketTamperedError, match="Auth_Tkt"):
        az.open_request(replace(msg, ticket=".".join([head, key, iv, flipped, tag])))


def test_ticket_from_another_as_is_refused(pki, world, clock, replay_cache):
    sk3, _ = world
    other_az = AuthorizationServer(did=A_DID, key=pki.a.key, sk3=os.urandom(32), replay_cache=replay_cache,
                                   clock=clock)
    with pytest.raises(TicketTamperedError):
        other_az.open_request(send(login(sk3, clock), clock))


def test_expired_auth_ticket(world, clock):
    sk3, az = world
    msg = send(login(sk3, clock), clock)
    clock.advance(minutes=11)
    with pytest.raises(TicketExpiredError, match="Auth_Tkt"):
        az.open_request(msg)


def test_stale_migration_request(world, clock):
    sk3, az = world
    msg = send(login(sk3, clock), clock)
    clock.advance(minutes=3)
    with pytest.raises(TicketExpiredError, match="MigrationRequest time"):
        az.open_request(msg)


def test_replayed_migration_request(world, clock):
    sk3, az = world
    msg = send(login(sk3, clock), clock)
    az.open_request(msg)
    with pytest.raises(ReplayError, match="MigrationRequest"):
        az.open_request(msg)


def test_replayed_auth_ticket_with_a_fresh_request(world, clock):
    sk3, az = world
    creds = login(sk3, clock)
    az.open_request(send(creds, clock))
    with pytest.raises(ReplayError, match="Auth_Tkt"):
        az.open_request(send(creds, clock))  # new Nonce3, same ticket


def test_refused_request_burns_no_nonce(world, clock):
    sk3, az = world
    creds = login(sk3, clock)
    bad = send(creds, clock)
    bad = replace(bad, sealed=send(replace(creds, sk2=os.urandom(32)), clock).sealed)
    with pytest.raises(TicketTamperedError, match="SK2"):
        az.open_request(bad)
    assert az.open_request(send(creds, clock)).user_id == "alice"


def test_request_validation():
    with pytest.raises(MalformedMessageError, match="mode"):
        MigrationRequest(vm="v", mode="warm", dest_did=B_DID)
    with pytest.raises(MalformedMessageError, match="vm"):
        MigrationRequest(vm="../etc", mode="cold", dest_did=B_DID)
    with pytest.raises(MalformedMessageError, match="options"):
        MigrationRequest(vm="v", mode="cold", dest_did=B_DID, options={"x": 1.5})
    with pytest.raises(MalformedMessageError, match="unknown field"):
        AuthRequest.decode(b'{"v":1,"t":"auth-req","user":"a","nonce1":"AAAAAAAAAAAAAAAAAAAAAA","x":1}')
    with pytest.raises(MalformedMessageError, match="duplicate"):
        AuthRequest.decode(b'{"v":1,"v":1,"t":"auth-req","user":"a","nonce1":"AAAAAAAAAAAAAAAAAAAAAA"}')
    with pytest.raises(MalformedMessageError, match="version"):
        AuthRequest.decode(b'{"v":2,"t":"auth-req","user":"a","nonce1":"AAAAAAAAAAAAAAAAAAAAAA"}')

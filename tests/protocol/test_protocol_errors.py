"""What a peer is told about a failure (migsec.protocol.errors): a code and a fixed text, never
the local detail; the receiving side renders the code in its own words."""
from __future__ import annotations

import errno

import pytest

from migsec.errors import (
    AuthorizationDenied,
    IntegrityError,
    MalformedMessageError,
    ResumeError,
    StreamRefusedError,
    TransferError,
    VirtError,
)
from migsec.protocol.errors import (
    PEER_ERRORS,
    parse_peer_reason,
    peer_error_code,
    peer_error_text,
    peer_reason,
    refusal_decision,
)
from migsec.protocol.handshake import MigrationRefused

from test_protocol_handshake import REQUEST, authr_tkt, deliver, pair

FAKE_SOCKET = "/run/fake-b/libvirt/libvirt-sock"
LOCAL_FAILURES = [
    VirtError(f"cannot connect to {FAKE_SOCKET}: Permission denied"),
    TransferError(f"stream 'disk0': write failed at 4096 in /srv/b/stage/disk0.part: No space left on device"),
    OSError(errno.ENOSPC, "No space left on device", "/srv/b/stage/disk0.part"),
    AuthorizationDenied(f"cloud-b.example already has a file at /srv/b/db.qcow2", decision="Conflict"),
    IntegrityError("stream 'disk0': SHA-256 of /srv/b/stage/disk0.part does not match"),
]


@pytest.mark.parametrize("exc", LOCAL_FAILURES, ids=lambda e: type(e).__name__)
def test_a_signed_nack_names_no_path_and_no_exception_class(pki, clock, replay_cache, exc):
    src, dst = pair(pki, clock, replay_cache)
    deliver(src.initiate(REQUEST, authr_tkt(pki.a, clock)), dst)
    refused = deliver(dst.refuse(peer_reason(exc)), src)
    assert isinstance(refused, MigrationRefused)
    assert "/" not in refused.reason and "libvirt-sock" not in refused.reason
    assert type(exc).__name__ not in refused.reason and str(exc) not in refused.reason
    code = parse_peer_reason(refused.reason)
    assert code == peer_error_code(exc) and refused.reason == f"{code}: {peer_error_text(code)}"


@pytest.mark.parametrize("exc, code", [
    (AuthorizationDenied("policy: Deny"), "denied"),
    (AuthorizationDenied("NotApplicable", decision="NotApplicable"), "denied"),
    (AuthorizationDenied("no memory", decision="Capacity"), "capacity"),
    (AuthorizationDenied("file exists", decision="Conflict"), "conflict"),
    (AuthorizationDenied("used before", decision="Invalid"), "bad-request"),
    (IntegrityError("x"), "integrity"),
    (ResumeError("x"), "resume"),
    (StreamRefusedError("x"), "bad-request"),
    (MalformedMessageError("x"), "bad-request"),
    (TransferError("x"), "internal"),
    (VirtError("x"), "internal"),
    (OSError(errno.EIO, "I/O error"), "internal"),
    (RuntimeError("bug"), "internal"),
])
def test_each_failure_has_its_code(exc, code):
    assert peer_error_code(exc) == code


@pytest.mark.parametrize("code", sorted(PEER_ERRORS))
def test_codes_round_trip_through_the_reason_string(code):
    reason = peer_reason(code)
    assert parse_peer_reason(reason) == code and reason.endswith(peer_error_text(code))
    assert 0 < len(reason) <= 1024  # fits a Nack's reason


@pytest.mark.parametrize("code", ["capacity", "conflict", "bad-request", "denied"])
def test_a_refusal_maps_back_to_the_decision_it_came_from(code):
    # B: AuthorizationDenied(decision) -> code on the wire -> A: AuthorizationDenied(decision) -> same code
    back = AuthorizationDenied("x", decision=refusal_decision(code))
    assert peer_error_code(back) == code


@pytest.mark.parametrize("reason", ["VirtError: cannot connect to /run/x", "", None, 42, "no-such-code: text"])
def test_a_peer_reason_without_a_known_code_reads_as_internal(reason):
    assert parse_peer_reason(reason) == "internal"
    assert peer_error_text("no-such-code") == PEER_ERRORS["internal"]
    assert peer_reason("no-such-code") == peer_reason("internal")

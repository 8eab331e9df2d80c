"""Receipt -> Decision -> Resumed, each signed by its domain and checkable later with the certificate."""
from datetime import datetime, timezone

import pytest

from migsec.crypto import sha256
from migsec.errors import MalformedMessageError, TicketError, TicketTamperedError
from migsec.protocol.commit import Decision, Receipt, Resumed, token_hash

NOW = datetime(2026, 11, 26, 17, 0, tzinfo=timezone.utc)


def test_commit_chain_verifies_with_each_signers_key(pki):
    receipt = Receipt(migration_id="m-1", src_did=pki.a.did, dest_did=pki.b.did,
                      streams={"disk:vda": sha256(b"disk"), "memory": sha256(b"mem"), "domain.xml": sha256(b"<x/>")},
                      transcript_hash=sha256(b"th"), issued_at=NOW)
    r_tok = receipt.sign(pki.b.key)
    got = Receipt.verify(r_tok, pki.b.public_key, migration_id="m-1")
    assert got == receipt and got.streams["memory"] == sha256(b"mem")

    decision = Decision(migration_id="m-1", src_did=pki.a.did, dest_did=pki.b.did, decision="commit",
                        receipt_hash=token_hash(r_tok), issued_at=NOW)
    d_tok = decision.sign(pki.a.key)
    assert Decision.verify(d_tok, pki.a.public_key).receipt_hash == token_hash(r_tok)

    resumed = Resumed(migration_id="m-1", src_did=pki.a.did, dest_did=pki.b.did,
                      decision_hash=token_hash(d_tok), issued_at=NOW)
    assert Resumed.verify(resumed.sign(pki.b.key), pki.b.public_key) == resumed

    # the wrong signer, the wrong migration, the wrong kind of message
    with pytest.raises(TicketTamperedError):
        Receipt.verify(r_tok, pki.a.public_key)
    with pytest.raises(TicketError, match="migration"):
        Receipt.verify(r_tok, pki.b.public_key, migration_id="m-2")
    with pytest.raises(MalformedMessageError, match="typ"):
        Decision.verify(r_tok, pki.b.public_key)


def test_tampered_receipt(pki):
    tok = Receipt(migration_id="m-1", src_did=pki.a.did, dest_did=pki.b.did, streams={"memory": sha256(b"x")},
                  transcript_hash=sha256(b"th"), issued_at=NOW).sign(pki.b.key)
    head, claims, sig = tok.split(".")
    tampered = ".".join([head, claims[:-3] + ("A" if claims[-3] != "A" else "B") + claims[-2:], sig])
    with pytest.raises((TicketTamperedError, MalformedMessageError)):
        Receipt.verify(tampered, pki.b.public_key)


def test_validation():
    with pytest.raises(MalformedMessageError, match="receipt_hash"):
        Decision(migration_id="m", src_did="a.example", dest_did="b.example", decision="commit", issued_at=NOW)
    abort = Decision(migration_id="m", src_did="a.example", dest_did="b.example", decision="abort",
                     issued_at=NOW, reason="receipt digest mismatch on disk:vda")
    assert Decision.from_claims(abort.claims()) == abort
    with pytest.raises(MalformedMessageError):
        Receipt(migration_id="m", src_did="a.example", dest_did="b.example", streams={}, transcript_hash=bytes(32),
                issued_at=NOW)

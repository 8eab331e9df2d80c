"""Ledger: a good ledger verifies; every kind of tampering is found and named."""
from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migsec.audit import GENESIS, SIGNER_KIND, Ledger, entry_hash
from migsec.crypto.envelope import jws_sign
from migsec.errors import AuditError, LedgerCorruptError
from migsec.pki import CertificateAuthority, TrustStore


def peer_receipt(identity, migration_id):
    """What the destination signs: a receipt for a restored VM."""
    return jws_sign({"typ": "receipt", "mid": migration_id, "dest": identity.did,
                     "sha256": "ab" * 32}, identity.key, kid=identity.did)


@pytest.fixture
def good(tmp_path, cloud_a, cloud_b, clock):
    ledger = Ledger(tmp_path / "ledger.jsonl", cloud_a, clock=clock)
    ledger.append("migration-requested", "m1", {"user": "alice", "vm": "vm1"})
    ledger.append("authorization-ticket", "m1", token="eyJ.x.y")
    ledger.append("mig-resp", "m1", peer_token=peer_receipt(cloud_b, "m1"),
                  peer_cert_pem=cloud_b.cert_pem, peer_did=cloud_b.did)
    ledger.append("receipt", "m1", peer_token=peer_receipt(cloud_b, "m1"),
                  peer_cert_pem=cloud_b.cert_pem, peer_did=cloud_b.did)
    ledger.append("decision", "m1", decision="commit")
    ledger.append("migration-requested", "m2", user="bob")
    return ledger


def lines(ledger):
    return ledger.path.read_bytes().splitlines(keepends=True)


def rewrite(ledger, new_lines):
    ledger.path.write_bytes(b"".join(new_lines))


def test_good_ledger_verifies(good, pki, cloud_b):
    report = good.verify(pki.trust)
    assert report.entries == 7  # signer + 6
    assert report.peer_messages == 2
    assert report.signers == ("cloud-a.example",)
    entries = list(good.entries())
    assert entries[0].kind == SIGNER_KIND and entries[0].prev == GENESIS
    assert [e.seq for e in entries] == list(range(1, 8))
    assert all(b.prev == a.hash for a, b in zip(entries, entries[1:]))
    assert entries[-1].hash == report.last_hash == entry_hash(entries[-1].as_dict())
    assert [e.kind for e in good.entries("m2")] == ["migration-requested"]
    assert entries[2].body == {"token": "eyJ.x.y"}
    assert entries[3].peer["did"] == "cloud-b.example"
    assert entries[3].peer["cert_pem"] == cloud_b.cert_pem.decode()


def test_a_reopened_ledger_continues_the_chain(good, cloud_a, pki, clock):
    again = Ledger(good.path, cloud_a, clock=clock)
    e = again.append("done", "m1")
    assert e.seq == 8
    assert [x.kind for x in again.entries()].count(SIGNER_KIND) == 1  # same key: no new signer
    assert again.verify(pki.trust).entries == 8


def test_edited_entry_is_detected(good, pki):
    ls = lines(good)
    doc = json.loads(ls[5])
    doc["body"]["decision"] = "abort"
    ls[5] = json.dumps(doc).encode() + b"\n"
    rewrite(good, ls)
    with pytest.raises(LedgerCorruptError, match=r"entry 6 \(line 6, decision\): content does "
                                                  r"not match its hash \(edited\)"):
        good.verify(pki.trust)


def test_edited_entry_with_recomputed_hash_is_detected(good, pki):
    ls = lines(good)
    doc = json.loads(ls[5])
    doc["body"]["decision"] = "abort"
    doc["hash"] = entry_hash(doc)
    ls[5] = json.dumps(doc).encode() + b"\n"
    rewrite(good, ls)
    with pytest.raises(LedgerCorruptError, match=r"entry 6 .*local signature covers another entry"):
        good.verify(pki.trust)


def test_deleted_entry_is_detected(good, pki):
    ls = lines(good)
    del ls[2]
    rewrite(good, ls)
    with pytest.raises(LedgerCorruptError, match=r"line 3: expected entry 3, found entry 4 "
                                                  r"\(an entry was deleted"):
        good.verify(pki.trust)


def test_deleted_and_renumbered_entry_is_detected(good, pki):
    # a careful forger renumbers the rest: the prev links still give it away
    ls = lines(good)
    del ls[2]
    for i in range(2, len(ls)):
        doc = json.loads(ls[i])
        doc["seq"] -= 1
        ls[i] = json.dumps(doc).encode() + b"\n"
    rewrite(good, ls)
    with pytest.raises(LedgerCorruptError, match=r"entry 3 .*does not chain to the entry before"):
        good.verify(pki.trust)


def test_reordered_pair_is_detected(good, pki):
    ls = lines(good)
    ls[3], ls[4] = ls[4], ls[3]
    rewrite(good, ls)
    with pytest.raises(LedgerCorruptError, match=r"line 4: expected entry 4, found entry 5 "
                                                  r"\(.*reordered"):
        good.verify(pki.trust)


def test_forged_peer_signature_is_detected(tmp_path, cloud_a, cloud_b, pki, clock):
    # the ledger's own writer fabricates B's receipt: chain and local signature are fine,
    # but B never signed it
    ledger = Ledger(tmp_path / "l.jsonl", cloud_a, clock=clock)
    ledger.append("migration-requested", "m1")
    ledger.append("receipt", "m1", peer_token=peer_receipt(cloud_a, "m1"),
                  peer_cert_pem=cloud_b.cert_pem, peer_did=cloud_b.did)
    with pytest.raises(LedgerCorruptError, match=r"entry 3 \(line 3, receipt\): peer signature "
                                                  r"of cloud-b.example does not verify with the "
                                                  r"certificate stored with it"):
        ledger.verify(pki.trust)


def test_peer_certificate_must_chain_and_match_did(tmp_path, cloud_a, cloud_b, pki, clock, t0):
    other_ca = CertificateAuthority.create(tmp_path / "rogue-ca", "Rogue", now=t0)
    other_ca.issue_domain("cloud-b.example", tmp_path / "rogue-b", now=t0)
    rogue_pem = (tmp_path / "rogue-b/domain-cert.pem").read_bytes()
    ledger = Ledger(tmp_path / "l.jsonl", cloud_a, clock=clock)
    ledger.append("receipt", "m1", peer_token=peer_receipt(cloud_b, "m1"),
                  peer_cert_pem=rogue_pem, peer_did="cloud-b.example")
    with pytest.raises(LedgerCorruptError, match=r"peer certificate of cloud-b.example is not "
                                                  r"trusted"):
        ledger.verify(pki.trust)
    ledger2 = Ledger(tmp_path / "l2.jsonl", cloud_a, clock=clock)
    ledger2.append("receipt", "m1", peer_token=peer_receipt(cloud_b, "m1"),
                   peer_cert_pem=cloud_b.cert_pem, peer_did="cloud-c.example")
    with pytest.raises(LedgerCorruptError, match=r"peer certificate of cloud-c.example is not "
                                                  r"trusted"):
        ledger2.verify(pki.trust)


def test_truncated_last_line_is_detected_and_not_extended(good, cloud_a, pki, clock):
    data = good.path.read_bytes()
    good.path.write_bytes(data[:-40])
    with pytest.raises(LedgerCorruptError, match=r"line 7 is incomplete"):
        good.verify(pki.trust)
    with pytest.raises(LedgerCorruptError, match=r"last line is incomplete"):
        Ledger(good.path, cloud_a, clock=clock).append("decision", "m9")
    assert good.path.read_bytes() == data[:-40]  # nothing appended to a damaged file


def test_unknown_ca_or_expired_signer_fails(tmp_path, pki, clock, make_clock, t0):
    short = pki.identity("cloud-s.example", "short-lived", days=1)
    late = make_clock(dt.timedelta(days=3))
    ledger = Ledger(tmp_path / "l.jsonl", short, clock=late)
    ledger.append("decision", "m1")
    with pytest.raises(LedgerCorruptError, match=r"entry 1 .*signer certificate is not trusted "
                                                  r"at 2026-11-29"):
        ledger.verify(pki.trust)
    ok = Ledger(tmp_path / "ok.jsonl", short, clock=clock)
    ok.append("decision", "m1")
    other = CertificateAuthority.create(tmp_path / "other-ca", "Other", now=t0)
    with pytest.raises(LedgerCorruptError, match="signer certificate is not trusted"):
        ok.verify(TrustStore.from_pem([other.cert_pem]))
    assert ok.verify(pki.trust).entries == 2


def test_key_rotation_records_a_new_signer(tmp_path, cloud_a, pki, clock):
    path = tmp_path / "l.jsonl"
    Ledger(path, cloud_a, clock=clock).append("decision", "m1")
    rotated = pki.identity("cloud-a.example", "cloud-a-rotated")
    Ledger(path, rotated, clock=clock).append("decision", "m2")
    report = Ledger(path).verify(pki.trust)
    assert report.entries == 4 and report.signers == ("cloud-a.example", "cloud-a.example")
    # an entry signed by the old key after the rotation is caught
    ls = path.read_bytes().splitlines(keepends=True)
    forged = Ledger(tmp_path / "scratch.jsonl", cloud_a, clock=clock)
    entry = forged._make(5, json.loads(ls[-1])["hash"], "decision", "m3", {}, None)
    path.write_bytes(b"".join(ls) + json.dumps(entry.as_dict()).encode() + b"\n")
    with pytest.raises(LedgerCorruptError, match=r"entry 5 .*local signature by cloud-a.example "
                                                  r"does not verify"):
        Ledger(path).verify(pki.trust)


@pytest.mark.parametrize("chunk", [7, 100, 1 << 20])
def test_a_fresh_writer_finds_tip_and_signer_from_the_tail(tmp_path, cloud_a, pki, clock,
                                                         monkeypatch, chunk):
    """Appends read only the tail: the tip from the last line, the signer by searching back
    (chunk sizes smaller than a line and than the search string cross every boundary)."""
    import migsec.audit.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "_LINE_CHUNK", chunk)
    monkeypatch.setattr(ledger_module, "_SCAN_CHUNK", chunk)
    path = tmp_path / "l.jsonl"
    rotated = pki.identity("cloud-a.example", f"cloud-a-rotated-tail-{chunk}")
    Ledger(path, cloud_a, clock=clock).append("decision", "m1", note="x" * 300)
    # bodies that mention the signer kind do not count as signer entries
    Ledger(path, cloud_a, clock=clock).append("decision", "m2", {"kind": SIGNER_KIND,
                                              "certificate": rotated.cert_pem.decode()})
    assert Ledger(path, rotated, clock=clock).append("decision", "m3").seq == 5  # new signer at 4
    Ledger(path, rotated, clock=clock).append("decision", "m4", text=f'"{SIGNER_KIND}"')
    assert Ledger(path, cloud_a, clock=clock).append("decision", "m5").seq == 8  # back: signer at 7
    assert Ledger(path, cloud_a, clock=clock).append("decision", "m6").seq == 9
    report = Ledger(path).verify(pki.trust)
    assert report.entries == 9 and len(report.signers) == 3
    assert [e.kind for e in Ledger(path).entries()].count(SIGNER_KIND) == 3


def test_a_signer_beyond_the_window_is_declared_again(tmp_path, cloud_a, pki, clock, monkeypatch):
    """A fresh writer looks back SIGNER_WINDOW bytes at most; further back, it repeats its
    ledger-signer entry, and the ledger still verifies. A writer that saw the signer itself
    does not repeat it."""
    import migsec.audit.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "SIGNER_WINDOW", 4000)
    path = tmp_path / "l.jsonl"
    steady = Ledger(path, cloud_a, clock=clock)
    for i in range(12):
        steady.append("progress", "m1", i=i, pad="p" * 400)
    assert path.stat().st_size > 4000
    kinds = [e.kind for e in Ledger(path).entries()]
    assert kinds.count(SIGNER_KIND) == 1  # the same object knew its signer all along
    assert Ledger(path, cloud_a, clock=clock).append("decision", "m1").seq == 15  # re-declared at 14
    assert Ledger(path, cloud_a, clock=clock).append("decision", "m2").seq == 16  # within the window now
    report = Ledger(path).verify(pki.trust)
    assert report.entries == 16 and report.signers == ("cloud-a.example", "cloud-a.example")


def test_failed_append_does_not_move_the_chain_tip(tmp_path, cloud_a, pki, monkeypatch):
    import os as os_module

    ledger = Ledger(tmp_path / "l.jsonl", cloud_a)
    ledger.append("decision", "m1")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os_module, "fsync", disk_full)
        with pytest.raises(AuditError, match="cannot append to the ledger: No space left"):
            ledger.append("decision", "m2")
    # the line reached the page cache (not durable, but present): the chain must still hold
    assert ledger.append("decision", "m3").seq == 4
    assert ledger.verify(pki.trust).entries == 4


def test_bad_appends_are_refused(tmp_path, cloud_a):
    ledger = Ledger(tmp_path / "l.jsonl", cloud_a)
    with pytest.raises(AuditError, match="kind"):
        ledger.append("bad kind", "m1")
    with pytest.raises(AuditError, match="needs both"):
        ledger.append("receipt", "m1", peer_token="a.b.c")
    with pytest.raises(AuditError, match="not a compact JWS"):
        ledger.append("receipt", "m1", peer_token="nope", peer_cert_pem=cloud_a.cert_pem)
    with pytest.raises(AuditError, match="not plain JSON"):
        ledger.append("decision", "m1", when=object())
    with pytest.raises(AuditError, match="read-only"):
        Ledger(tmp_path / "l.jsonl").append("decision", "m1")
    assert not (tmp_path / "l.jsonl").exists() or (tmp_path / "l.jsonl").read_bytes() == b""


def test_concurrent_appends_from_threads(tmp_path, cloud_a, pki):
    ledger = Ledger(tmp_path / "l.jsonl", cloud_a)

    def work(n):
        for i in range(15):
            ledger.append("progress", f"m{n}", i=i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.verify(pki.trust).entries == 61


def _append_in_child(path, identity, n):
    ledger = Ledger(path, identity)
    for i in range(n):
        ledger.append("progress", "shared", i=i)


def test_concurrent_appends_from_processes(tmp_path, cloud_a, pki):
    path = tmp_path / "l.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_in_child, args=(path, cloud_a, 15)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    report = Ledger(path).verify(pki.trust)
    # each process writes a signer entry if it found none: one or two of them
    assert report.entries - len(report.signers) == 30


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | st.dictionaries(st.sampled_from(["seq", "time", "kind", "migration_id", "prev", "body",
                                          "peer", "hash", "sig"]),
                         st.integers() | st.text(max_size=8) | st.none() | st.booleans()
                         | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
                         max_size=9).map(lambda d: json.dumps(d).encode()))
def test_any_damaged_line_is_a_ledger_error(good, pki, junk):
    original = good.path.read_bytes()
    try:
        good.path.write_bytes(original + junk.replace(b"\n", b" ") + b"\n")
        with pytest.raises(LedgerCorruptError):
            good.verify(pki.trust)
    finally:
        good.path.write_bytes(original)

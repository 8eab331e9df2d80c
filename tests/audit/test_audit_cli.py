"""`migsec audit show|verify` through the real entry point."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from migsec.audit import Ledger
from migsec.cli import main
from migsec.crypto.envelope import jws_sign


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def setup(tmp_path, pki, cloud_a, cloud_b, clock):
    """A config whose state_dir holds a ledger with local and peer-signed entries."""
    shutil.copy(pki.root / "cloud-a.example/ca-cert.pem", tmp_path / "ca.pem")
    (tmp_path / "policies").mkdir()
    cfg = tmp_path / "migsecd.toml"
    cfg.write_text(f"""
[domain]
id = "cloud-a.example"
key = "{pki.root}/cloud-a.example/domain-key.pem"
certificate = "{pki.root}/cloud-a.example/domain-cert.pem"
trust = ["ca.pem"]
[paths]
state_dir = "state"
policy_dir = "policies"
""")
    ledger = Ledger(tmp_path / "state/ledger.jsonl", cloud_a, clock=clock)
    ledger.append("migration-requested", "m1", user="alice", vm="vm1")
    receipt = jws_sign({"mid": "m1", "ok": True}, cloud_b.key, kid=cloud_b.did)
    ledger.append("receipt", "m1", peer_token=receipt, peer_cert_pem=cloud_b.cert_pem,
                  peer_did=cloud_b.did)
    ledger.append("migration-requested", "m2", user="bob", vm="vm2")
    return cfg, ledger


def test_verify_ok_and_show(setup):
    cfg, ledger = setup
    r = run("audit", "--config", str(cfg), "verify")
    assert r.exit_code == 0, r.output
    assert "OK, 4 entries, 1 peer-signed messages, signers cloud-a.example" in r.output
    r = run("audit", "--config", str(cfg), "show", "--migration", "m1")
    assert r.exit_code == 0
    out = r.output.splitlines()
    assert len(out) == 2 and "user=alice" in out[0] and "[signed by cloud-b.example]" in out[1]
    r = run("audit", "--config", str(cfg), "show", "--json")
    docs = [json.loads(line) for line in r.output.splitlines()]
    assert [d["seq"] for d in docs] == [1, 2, 3, 4]
    assert docs[2]["peer"]["did"] == "cloud-b.example"


def test_verify_a_copy_with_explicit_trust(setup, tmp_path):
    _, ledger = setup
    copy = tmp_path / "copy.jsonl"
    shutil.copy(ledger.path, copy)
    r = run("audit", "--ledger", str(copy), "verify", "--trust", str(tmp_path / "ca.pem"))
    assert r.exit_code == 0 and "OK, 4 entries" in r.output


def test_verify_fails_naming_the_entry(setup):
    cfg, ledger = setup
    lines = ledger.path.read_bytes().splitlines(keepends=True)
    doc = json.loads(lines[3])
    doc["body"]["user"] = "mallory"
    lines[3] = json.dumps(doc).encode() + b"\n"
    ledger.path.write_bytes(b"".join(lines))
    r = run("audit", "--config", str(cfg), "verify")
    assert r.exit_code == 1
    assert "entry 4 (line 4, migration-requested): content does not match its hash" in r.output


def test_missing_ledger_and_config(setup, tmp_path):
    cfg, ledger = setup
    ledger.path.unlink()
    r = run("audit", "--config", str(cfg), "verify")
    assert r.exit_code == 2 and "no audit ledger" in r.output
    r = run("audit", "--config", str(tmp_path / "nope.toml"), "show")
    assert r.exit_code == 2 and "configuration file not found" in r.output

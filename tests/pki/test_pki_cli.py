"""`migsec ca ...` through the real top-level group, as a user runs it."""
from __future__ import annotations

import datetime as dt
import os
import stat

import pytest
from click.testing import CliRunner

from migsec.cli import main
from migsec.errors import CertificateRevokedError
from migsec.pki import TrustStore


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def test_init_issue_show_revoke(tmp_path):
    ca_dir, out = tmp_path / "ca", tmp_path / "b"
    r = run("ca", "init", str(ca_dir), "--name", "Lab CA")
    assert r.exit_code == 0, r.output
    assert "Lab CA" in r.output and "SHA256:" in r.output
    r = run("ca", "issue", "--did", "cloud-b.example", "--out", str(out), "--ca", str(ca_dir), "--days", "30")
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(os.stat(out / "domain-key.pem").st_mode) == 0o600
    r = run("ca", "show", str(out / "domain-cert.pem"))
    assert r.exit_code == 0, r.output
    for expected in ["domain id       cloud-b.example", "Lab CA", "ec-p256", "key_agreement", "migsec-domain", "SHA256:"]:
        assert expected in r.output, r.output
    r = run("ca", "revoke", str(out / "domain-cert.pem"), "--ca", str(ca_dir))
    assert r.exit_code == 0, r.output
    store = TrustStore.from_files([ca_dir / "ca-cert.pem"], [ca_dir / "crl.pem"])
    with pytest.raises(CertificateRevokedError):
        store.verify((out / "domain-cert.pem").read_bytes(), at=dt.datetime.now(dt.timezone.utc))


def test_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nope"
    r = run("ca", "issue", "--did", "cloud-b.example", "--out", str(tmp_path / "b"), "--ca", str(missing))
    assert r.exit_code == 2 and f"CA directory {missing} does not exist" in r.output
    r = run("ca", "issue", "--did", "cloud-b.example", "--out", str(tmp_path / "b"), env={"MIGSEC_CA": str(missing)})
    assert r.exit_code == 2 and str(missing) in r.output  # --ca from the environment
    assert run("ca", "init", str(tmp_path / "ca")).exit_code == 0
    r = run("ca", "issue", "--did", "Cloud B", "--out", str(tmp_path / "b"), "--ca", str(tmp_path / "ca"))
    assert r.exit_code == 2 and "invalid domain id 'Cloud B'" in r.output
    args = ["ca", "issue", "--did", "cloud-b.example", "--out", str(tmp_path / "b"), "--ca", str(tmp_path / "ca")]
    assert run(*args).exit_code == 0
    key_before = (tmp_path / "b" / "domain-key.pem").read_bytes()
    r = run(*args)
    assert r.exit_code == 1 and "already exists; not overwriting" in r.output and "--force" in r.output
    assert (tmp_path / "b" / "domain-key.pem").read_bytes() == key_before
    assert run(*args, "--force").exit_code == 0
    assert (tmp_path / "b" / "domain-key.pem").read_bytes() != key_before
    r = run("ca", "init", str(tmp_path / "ca"))
    assert r.exit_code == 1 and "not replacing the CA" in r.output
    r = run("ca", "show", str(tmp_path / "missing.pem"))
    assert r.exit_code == 2 and "missing.pem" in r.output
    r = run("ca", "issue", "--did", "cloud-e.example", "--out", str(tmp_path / "e"), "--ca", str(tmp_path / "ca"),
            "--key-type", "ed25519")
    assert r.exit_code == 2 and "ed25519" in r.output  # click's choice error

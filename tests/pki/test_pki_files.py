"""Key files, CA directories and domain identities on disk."""
from __future__ import annotations

import os
import shutil
import stat

import pytest

from migsec.crypto.keys import KeyExistsError
from migsec.errors import CertificateError, ConfigError, KeyLoadError
from migsec.pki import CertificateAuthority, DomainIdentity, InvalidDidError


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_key_files_are_0600_and_loose_ones_refused(ca, domain_b, tmp_path):
    out, _ = domain_b
    assert mode(out / "domain-key.pem") == 0o600
    assert mode(ca.directory / "ca-key.pem") == 0o600
    assert mode(ca.directory) == 0o700
    copy = tmp_path / "d"
    shutil.copytree(out, copy)
    os.chmod(copy / "domain-key.pem", 0o644)
    with pytest.raises(KeyLoadError, match="0644"):
        DomainIdentity.load(copy / "domain-key.pem", copy / "domain-cert.pem")
    ca_copy = tmp_path / "ca"
    shutil.copytree(ca.directory, ca_copy)
    os.chmod(ca_copy / "ca-key.pem", 0o640)
    with pytest.raises(KeyLoadError, match="0640"):
        CertificateAuthority.load(ca_copy)


def test_identity_key_must_match_certificate(ca, domain_b, tmp_path, now):
    out, _ = domain_b
    other = ca.issue_domain("cloud-z.example", tmp_path / "z", now=now)
    with pytest.raises(ConfigError, match="is not the key of certificate"):
        DomainIdentity.load(out / "domain-key.pem", other)


def test_ca_load_errors(tmp_path, ca):
    with pytest.raises(ConfigError, match="does not exist"):
        CertificateAuthority.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="ca-key.pem is missing"):
        CertificateAuthority.load(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    other = CertificateAuthority.create(mixed, "Other")
    shutil.copy(ca.directory / "ca-cert.pem", mixed / "ca-cert.pem")
    with pytest.raises(ConfigError, match="does not belong"):
        CertificateAuthority.load(mixed)
    assert other.name == "Other"
    assert CertificateAuthority.load(ca.directory).cert == ca.cert


def test_issue_refusals(ca, domain_b, tmp_path):
    out, pem = domain_b
    before = (out / "domain-key.pem").read_bytes()
    with pytest.raises(KeyExistsError, match="not overwriting"):
        ca.issue_domain("cloud-b.example", out)
    assert (out / "domain-key.pem").read_bytes() == before
    for bad in ["", "Cloud-B.example", "-b.example", "b..example", "a_b.example", "x" * 64 + ".example"]:
        with pytest.raises(InvalidDidError):
            ca.issue_domain(bad, tmp_path / "bad")
    with pytest.raises(ConfigError, match="ed25519"):
        ca.issue_domain("cloud-e.example", tmp_path / "e", key_kind="ed25519")
    with pytest.raises(KeyExistsError, match="not replacing the CA"):
        CertificateAuthority.create(ca.directory, "again")


def test_revoke_only_own_domain_certificates(ca, domain_b, tmp_path, now):
    other = CertificateAuthority.create(tmp_path / "o", "Other", now=now)
    foreign = other.issue_domain("cloud-f.example", tmp_path / "f", now=now).read_bytes()
    with pytest.raises(CertificateError, match="not issued by this CA"):
        ca.revoke(foreign)
    with pytest.raises(CertificateError, match="CA certificate"):
        other.revoke(other.cert_pem)
    with pytest.raises(CertificateError, match="not a PEM"):
        other.revoke(b"junk")

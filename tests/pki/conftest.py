"""Fixtures for migsec.pki tests: one CA and one domain per session (key generation is slow)."""
from __future__ import annotations

import datetime as dt

import pytest

from migsec.pki import CertificateAuthority

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="session")
def now() -> dt.datetime:
    return NOW


@pytest.fixture(scope="session")
def ca(tmp_path_factory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca"), "Test Federation CA", now=NOW)


@pytest.fixture(scope="session")
def domain_b(ca, tmp_path_factory):
    """(directory, certificate PEM) of cloud-b.example issued by ``ca``."""
    out = tmp_path_factory.mktemp("cloud-b")
    cert_path = ca.issue_domain("cloud-b.example", out, now=NOW)
    return out, cert_path.read_bytes()

"""A CA and two domain identities (real certificates from migsec.pki) for ledger tests."""
from __future__ import annotations

import datetime as dt

import pytest

from migsec.pki import CertificateAuthority, DomainIdentity, TrustStore

T0 = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.timezone.utc)


class Pki:
    def __init__(self, root):
        self.root = root
        self.ca = CertificateAuthority.create(root / "ca", "Test CA", now=T0)
        self.trust = TrustStore.from_pem([self.ca.cert_pem])

    def identity(self, did: str, name: str | None = None, *, days: int = 365) -> DomainIdentity:
        out = self.root / (name or did)
        self.ca.issue_domain(did, out, days=days, now=T0)
        return DomainIdentity.load(out / "domain-key.pem", out / "domain-cert.pem")


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def cloud_a(pki):
    return pki.identity("cloud-a.example")


@pytest.fixture(scope="session")
def cloud_b(pki):
    return pki.identity("cloud-b.example")


class Clock:
    """Injected time: one second per entry from T0 + 1 h."""

    def __init__(self, start: dt.datetime = T0 + dt.timedelta(hours=1)):
        self.now = start

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(seconds=1)
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_clock():
    """A clock starting at T0 + ``offset``."""
    return lambda offset: Clock(T0 + offset)


@pytest.fixture
def t0():
    return T0

"""Real certificates from migsec.pki and a settable clock for the protocol tests."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from migsec.pki import CertificateAuthority, DomainIdentity, TrustStore
from migsec.protocol.replay import ReplayCache

A_DID = "cloud-a.example"
B_DID = "cloud-b.example"


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@dataclass
class Pki:
    ca: CertificateAuthority
    trust: TrustStore
    a: DomainIdentity
    b: DomainIdentity
    rogue_a: DomainIdentity  # a.example's DID, issued by a CA nobody trusts
    expired_a: DomainIdentity  # a.example, trusted CA, validity ended
    other: DomainIdentity  # a third trusted domain


def _issue(ca: CertificateAuthority, did: str, out: Path, **kw) -> DomainIdentity:
    ca.issue_domain(did, out, **kw)
    return DomainIdentity.load(out / "domain-key.pem", out / "domain-cert.pem")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(root / "ca", "federation CA")
    rogue = CertificateAuthority.create(root / "rogue-ca", "rogue CA")
    past = datetime.now(timezone.utc) - timedelta(days=30)
    return Pki(
        ca=ca,
        trust=TrustStore.from_files([root / "ca" / "ca-cert.pem"]),
        a=_issue(ca, A_DID, root / "a"),
        b=_issue(ca, B_DID, root / "b"),
        rogue_a=_issue(rogue, A_DID, root / "rogue-a"),
        expired_a=_issue(ca, A_DID, root / "expired-a", days=1, now=past),
        other=_issue(ca, "cloud-c.example", root / "c"),
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def replay_cache(clock: Clock) -> ReplayCache:
    return ReplayCache(max_entries=1000, clock=clock)

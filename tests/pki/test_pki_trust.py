"""TrustStore: a good certificate passes; each bad one is refused with its own error."""
from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from migsec.crypto import SigningKey
from migsec.crypto.certs import certificate_pem, sign_certificate
from migsec.errors import (
    CertificateError,
    CertificateExpiredError,
    CertificateRevokedError,
    ConfigError,
    DidMismatchError,
    KeyUsageError,
    UnknownIssuerError,
)
from migsec.pki import CertificateAuthority, DomainIdentity, TrustStore

DAY = dt.timedelta(days=1)


def ku(**on) -> x509.KeyUsage:
    names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


@pytest.fixture(scope="module")
def store(ca) -> TrustStore:
    return TrustStore.from_pem([ca.cert_pem])


def test_issue_then_verify(ca, domain_b, store, now):
    out, pem = domain_b
    peer = store.verify(pem, expected_did="cloud-b.example", at=now)
    ident = DomainIdentity.load(out / "domain-key.pem", out / "domain-cert.pem")
    assert peer.did == ident.did == "cloud-b.example"
    assert peer.public_key == ident.public_key
    assert peer.fingerprint == ident.fingerprint and peer.fingerprint.startswith("SHA256:")
    # the verified key really is the domain's: a signature by the domain key checks out
    peer.public_key.verify(ident.key.sign(b"MigResp"), b"MigResp")
    assert (out / "ca-cert.pem").read_bytes() == ca.cert_pem
    assert store.verify(pem, at=now).did == "cloud-b.example"  # no expectation: DID still extracted


def test_unknown_ca(domain_b, tmp_path, now):
    other = CertificateAuthority.create(tmp_path / "other", "Other CA", now=now)
    with pytest.raises(UnknownIssuerError):
        TrustStore.from_pem([other.cert_pem]).verify(domain_b[1], at=now)
    # same subject name as the real CA, different key: still unknown
    impostor = CertificateAuthority.create(tmp_path / "impostor", "Test Federation CA", now=now)
    forged = impostor.sign_domain_key("cloud-b.example", SigningKey.generate(), now=now)
    with pytest.raises(UnknownIssuerError):
        TrustStore.from_pem([_ca_pem(domain_b)]).verify(certificate_pem(forged), at=now)


def _ca_pem(domain_b) -> bytes:
    return (domain_b[0] / "ca-cert.pem").read_bytes()


def test_expired_and_not_yet_valid(domain_b, store, now):
    _, pem = domain_b
    with pytest.raises(CertificateExpiredError, match="expired"):
        store.verify(pem, at=now + 366 * DAY)
    with pytest.raises(CertificateExpiredError, match="not valid before"):
        store.verify(pem, at=now - DAY)
    store.verify(pem, at=now + 364 * DAY)  # still inside the window


def test_did_mismatch(domain_b, store, now):
    with pytest.raises(DidMismatchError, match="'cloud-b.example', expected 'cloud-a.example'"):
        store.verify(domain_b[1], expected_did="cloud-a.example", at=now)


def _with_sans(ca, sans: list[x509.GeneralName], now) -> bytes:
    """A certificate like a domain certificate but with the given SAN entries."""
    good = ca.sign_domain_key("cloud-b.example", SigningKey.generate(), now=now)
    builder = (x509.CertificateBuilder().subject_name(good.subject).issuer_name(good.issuer)
               .public_key(good.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(good.not_valid_before_utc).not_valid_after(good.not_valid_after_utc))
    for ext in good.extensions:
        if not isinstance(ext.value, x509.SubjectAlternativeName):
            builder = builder.add_extension(ext.value, ext.critical)
    builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return certificate_pem(sign_certificate(builder, ca.key))


@pytest.mark.parametrize("sans, match", [
    ([x509.DNSName("cloud-b.example")], "exactly one domain id"),
    ([x509.UniformResourceIdentifier("urn:migsec:domain:cloud-b.example"),
      x509.UniformResourceIdentifier("urn:migsec:domain:cloud-a.example")], "exactly one domain id"),
    ([x509.UniformResourceIdentifier("urn:migsec:domain:Cloud_B")], "invalid domain id"),
])
def test_certificate_without_one_valid_did_refused(ca, store, now, sans, match):
    with pytest.raises(DidMismatchError, match=match):
        store.verify(_with_sans(ca, sans, now), at=now)


@pytest.mark.parametrize("case, kwargs, match", [
    ("no digitalSignature", {"key_usage": ku(key_agreement=True)}, "digitalSignature"),
    ("no keyAgreement on EC", {"key_usage": ku(digital_signature=True)}, "keyAgreement"),
    ("CA usage on a leaf", {"key_usage": ku(digital_signature=True, key_agreement=True, crl_sign=True)}, "CA key usage"),
    ("TLS EKU only", {"eku": [ExtendedKeyUsageOID.CLIENT_AUTH]}, "migsec domain purpose"),
])
def test_wrong_key_usage(ca, store, now, case, kwargs, match):
    cert = ca.sign_domain_key("cloud-b.example", SigningKey.generate(), now=now, **kwargs)
    with pytest.raises(KeyUsageError, match=match):
        store.verify(certificate_pem(cert), expected_did="cloud-b.example", at=now)


def test_revoked_with_crl(tmp_path, now):
    ca = CertificateAuthority.create(tmp_path / "ca", "Revoking CA", now=now)
    bad = ca.issue_domain("cloud-x.example", tmp_path / "x", now=now).read_bytes()
    good = ca.issue_domain("cloud-y.example", tmp_path / "y", now=now).read_bytes()
    ca.revoke(bad, now=now)
    crl = ca.write_crl(days=7, now=now)
    store = TrustStore.from_files([tmp_path / "ca" / "ca-cert.pem"], [crl])
    with pytest.raises(CertificateRevokedError, match="revoked"):
        store.verify(bad, at=now)
    assert store.verify(good, at=now).did == "cloud-y.example"
    # an out-of-date CRL is refused rather than trusted or ignored
    with pytest.raises(CertificateError, match="out of date"):
        store.verify(good, at=now + 8 * DAY)
    # without CRLs configured the revoked certificate still chains (revocation is opt-in)
    assert TrustStore.from_pem([ca.cert_pem]).verify(bad, at=now).did == "cloud-x.example"


def test_crl_configured_but_missing_for_issuer(tmp_path, ca, domain_b, now):
    other = CertificateAuthority.create(tmp_path / "o", "Other CA", now=now)
    crl = other.write_crl(now=now)
    store = TrustStore.from_files([tmp_path / "o" / "ca-cert.pem"], [crl])
    store2 = TrustStore.from_pem([ca.cert_pem, other.cert_pem], [crl.read_bytes()])
    with pytest.raises(CertificateError, match="no CRL configured for CA"):
        store2.verify(domain_b[1], at=now)
    assert store  # the other CA's own store loads fine


def test_bad_trust_configuration(tmp_path, ca, domain_b, now):
    with pytest.raises(ConfigError, match="not a CA certificate"):
        TrustStore.from_pem([domain_b[1]])
    other = CertificateAuthority.create(tmp_path / "o", "Other CA", now=now)
    with pytest.raises(ConfigError, match="not signed by a trusted CA"):
        TrustStore.from_pem([ca.cert_pem], [other.write_crl(now=now).read_bytes()])
    with pytest.raises(ConfigError, match="no readable PEM"):
        TrustStore.from_pem([b"garbage"])
    with pytest.raises(CertificateError, match="not a PEM"):
        TrustStore.from_pem([ca.cert_pem]).verify(b"garbage", at=now)
    with pytest.raises(CertificateError, match="timezone-aware"):
        TrustStore.from_pem([ca.cert_pem]).verify(domain_b[1], at=now.replace(tzinfo=None))


def test_rsa_ca_and_rsa_domain(tmp_path, now):
    ca = CertificateAuthority.create(tmp_path / "rca", "RSA CA", key_kind="rsa-3072", now=now)
    pem = ca.issue_domain("cloud-r.example", tmp_path / "r", key_kind="rsa-3072", now=now).read_bytes()
    peer = TrustStore.from_pem([ca.cert_pem]).verify(pem, expected_did="cloud-r.example", at=now)
    assert peer.public_key.kind == "rsa-3072"


def test_certificate_with_a_broken_subject_is_refused_not_crashed(domain_b, store, now):
    """A peer's certificate whose subject is not valid UTF-8 parses, but reading the subject
    raises ValueError; the refusal must still be a certificate error naming the problem."""
    der = x509.load_pem_x509_certificate(domain_b[1]).public_bytes(serialization.Encoding.DER)
    at = der.index(b"cloud-b.example")  # the subject's CN (UTF8String) comes before the SAN
    broken = der[:at + 5] + b"\xed" + der[at + 6:]  # "cloud\xedb.example": a lone surrogate lead
    cert = x509.load_der_x509_certificate(broken)
    with pytest.raises(ValueError):
        cert.subject.rfc4514_string()  # the condition under test really holds
    pem = cert.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(UnknownIssuerError, match=r"\(unparseable subject\)"):
        store.verify(pem, at=now)

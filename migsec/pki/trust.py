"""Chain validation of domain certificates against configured CAs (and CRLs).

Path building, signatures, validity at the injected time and the CA profile are
done by ``cryptography.x509.verification``. migsec's own rules are validators
plugged into its end-entity extension policy (DID in the SAN, key usage, the
migsec EKU). CRLs are checked explicitly after the chain is built because the
verification API has no revocation support.
"""
from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from typing import cast
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509 import verification as xv

from migsec.crypto import VerifyingKey
from migsec.crypto.certs import certificate_fingerprint, certificate_public_key
from migsec.errors import (
    CertificateError,
    CertificateExpiredError,
    CertificateRevokedError,
    ConfigError,
    CryptoError,
    DidMismatchError,
    KeyUsageError,
    MigsecError,
    UnknownIssuerError,
)
from migsec.pki._files import read_bytes
from migsec.pki.names import MIGSEC_DOMAIN_EKU, did_from_san, validate_did


@dataclass(frozen=True)
class VerifiedPeer:
    """A certificate that passed every check, reduced to what the protocol needs."""

    did: str
    public_key: VerifyingKey
    fingerprint: str  # SHA256:<hex> of the certificate DER
    not_after: dt.datetime


def _load_pems(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{what} holds no readable PEM certificate") from exc


def _check_key_usage(kind: str, ku: x509.KeyUsage) -> None:
    if not ku.digital_signature:
        raise KeyUsageError("certificate key usage lacks digitalSignature")
    if kind == "ec-p256" and not ku.key_agreement:
        raise KeyUsageError("EC certificate key usage lacks keyAgreement (needed to receive ECDH-ES messages)")
    if kind.startswith("rsa-") and not ku.key_encipherment:
        raise KeyUsageError("RSA certificate key usage lacks keyEncipherment (needed to receive RSA-OAEP messages)")
    if ku.key_cert_sign or ku.crl_sign:
        raise KeyUsageError("a CA key usage (keyCertSign/cRLSign) on a domain certificate")


def _check_eku(eku: x509.ExtendedKeyUsage) -> None:
    if MIGSEC_DOMAIN_EKU not in list(eku):
        raise KeyUsageError(f"certificate extended key usage lacks the migsec domain purpose {MIGSEC_DOMAIN_EKU.dotted_string}")


class TrustStore:
    """Trusted CA certificates and, optionally, their CRLs."""

    def __init__(self, cas: Iterable[x509.Certificate], crls: Iterable[x509.CertificateRevocationList] = ()) -> None:
        self.cas = list(cas)
        if not self.cas:
            raise ConfigError("trust store has no CA certificate")
        for ca in self.cas:
            try:
                bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                bc = None
            if bc is None or not bc.ca:
                raise ConfigError(f"trusted certificate {ca.subject.rfc4514_string()} is not a CA certificate")
        self.crls = list(crls)
        for crl in self.crls:
            if not any(_crl_signed_by(crl, ca) for ca in self.cas):
                raise ConfigError(f"CRL from {crl.issuer.rfc4514_string()} is not signed by a trusted CA")
        self._store = xv.Store(self.cas)
        # Fixed per store; only the end-entity policy (its validators see the expected DID and
        # report into per-call state) and the verification time are built per verify().
        self._ca_policy = xv.ExtensionPolicy.webpki_defaults_ca()

    @classmethod
    def from_pem(cls, ca_pems: Iterable[bytes], crl_pems: Iterable[bytes] = ()) -> "TrustStore":
        cas = [c for i, pem in enumerate(ca_pems) for c in _load_pems(pem, f"CA PEM #{i + 1}")]
        crls = []
        for i, pem in enumerate(crl_pems):
            try:
                crls.append(x509.load_pem_x509_crl(pem))
            except ValueError as exc:
                raise ConfigError(f"CRL PEM #{i + 1} is not a PEM X.509 CRL") from exc
        return cls(cas, crls)

    @classmethod
    def from_files(cls, ca_paths: Iterable[str | os.PathLike[str]], crl_paths: Iterable[str | os.PathLike[str]] = ()) -> "TrustStore":
        """Load CA certificates (PEM, several per file allowed) and CRLs (PEM) from files."""
        cas = [c for p in ca_paths for c in _load_pems(read_bytes(p, "CA file"), f"CA file {p}")]
        crls = []
        for p in crl_paths:
            try:
                crls.append(x509.load_pem_x509_crl(read_bytes(p, "CRL file")))
            except ValueError as exc:
                raise ConfigError(f"CRL file {p} is not a PEM X.509 CRL") from exc
        return cls(cas, crls)

    def verify(
        self,
        cert_pem: bytes,
        *,
        expected_did: str | None = None,
        at: dt.datetime,
        intermediates: Iterable[bytes] = (),
    ) -> VerifiedPeer:
        """Verify a domain certificate at time ``at``; each failure has its own error class."""
        if at.tzinfo is None:
            raise CertificateError("verification time must be timezone-aware")
        if expected_did is not None:
            validate_did(expected_did)
        try:
            leaf = x509.load_pem_x509_certificate(cert_pem)
        except (ValueError, TypeError) as exc:
            raise CertificateError("peer certificate is not a PEM X.509 certificate") from exc
        inter = [c for i, pem in enumerate(intermediates) for c in _load_pems(pem, f"intermediate #{i + 1}")]

        # The verifier reports validator failures only as text, so keep the migsec error here.
        failures: list[MigsecError] = []
        found: dict[str, str] = {}
        keys: list[VerifyingKey] = []  # the end entity's key, read once for KU and the result

        def guarded(check):
            def validator(_policy, cert, ext):
                try:
                    check(cert, ext)
                except MigsecError as exc:
                    failures.append(exc)
                    raise
                except Exception as exc:  # anything else from a validator is our bug; refuse
                    failures.append(CertificateError(f"certificate check failed: {exc}"))
                    raise
            return validator

        def check_san(_cert, san):
            if san is None:
                raise DidMismatchError("certificate has no subjectAltName, so no domain id")
            try:
                did = did_from_san(san)
            except CertificateError as exc:
                raise DidMismatchError(str(exc)) from exc
            if expected_did is not None and did != expected_did:
                raise DidMismatchError(f"certificate is for domain {did!r}, expected {expected_did!r}")
            found["did"] = did

        def check_ku(cert, ku):
            if ku is None:
                raise KeyUsageError("certificate has no key usage extension")
            keys.append(certificate_public_key(cert))
            _check_key_usage(keys[-1].kind, ku)

        def check_eku(_cert, eku):
            if eku is None:
                raise KeyUsageError("certificate has no extended key usage")
            _check_eku(eku)

        agnostic = xv.Criticality.AGNOSTIC
        ee_policy = (
            xv.ExtensionPolicy.webpki_defaults_ee()
            .require_present(x509.SubjectAlternativeName, agnostic, guarded(check_san))
            .require_present(x509.KeyUsage, agnostic, guarded(check_ku))
            .require_present(x509.ExtendedKeyUsage, agnostic, guarded(check_eku))
        )
        verifier = (
            xv.PolicyBuilder()
            .store(self._store)
            .time(at)
            .max_chain_depth(2)
            .extension_policies(ca_policy=self._ca_policy, ee_policy=ee_policy)
            .build_client_verifier()
        )
        # Expiry first, so an out-of-date certificate is reported as such and not as "untrusted".
        if at < leaf.not_valid_before_utc:
            raise CertificateExpiredError(f"certificate is not valid before {leaf.not_valid_before_utc.isoformat()}")
        if at > leaf.not_valid_after_utc:
            raise CertificateExpiredError(f"certificate expired at {leaf.not_valid_after_utc.isoformat()}")
        try:
            chain = verifier.verify(leaf, inter).chain
        except xv.VerificationError as exc:
            if failures:
                raise failures[0] from exc
            if "not valid at validation time" in str(exc):
                raise CertificateExpiredError(f"a certificate in the chain is not valid at {at.isoformat()}") from exc
            raise UnknownIssuerError(
                f"certificate {_dn(leaf, 'subject')} issued by "
                f"{_dn(leaf, 'issuer')} (fingerprint {certificate_fingerprint(leaf)}) "
                f"does not chain to a trusted CA: {exc}") from exc
        if "did" not in found:  # the SAN validator must have run; never accept without it
            raise DidMismatchError("certificate domain id was not checked")
        self._check_revocation(chain, at)
        try:
            # the key the KU validator read from the verified leaf (the same certificate)
            public_key = keys[0] if len(keys) == 1 else certificate_public_key(leaf)
        except CryptoError as exc:
            raise KeyUsageError(f"certificate key is not usable by migsec: {exc}") from exc
        return VerifiedPeer(found["did"], public_key, certificate_fingerprint(leaf), leaf.not_valid_after_utc)

    def _check_revocation(self, chain: list[x509.Certificate], at: dt.datetime) -> None:
        if not self.crls:
            return
        for cert, issuer in zip(chain, chain[1:]):
            crls = [c for c in self.crls if _crl_signed_by(c, issuer)]
            if not crls:
                # CRLs are configured, so a CA without one is refused rather than silently unchecked.
                raise CertificateError(f"no CRL configured for CA {issuer.subject.rfc4514_string()}")
            for crl in crls:
                if crl.next_update_utc is not None and at > crl.next_update_utc:
                    raise CertificateError(
                        f"CRL of {issuer.subject.rfc4514_string()} is out of date since {crl.next_update_utc.isoformat()}; "
                        "fetch a fresh one (migsec ca crl)"
                    )
                if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                    raise CertificateRevokedError(f"certificate serial {cert.serial_number:x} is revoked by {issuer.subject.rfc4514_string()}")


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    # CA keys are EC or RSA (migsec.crypto.certs), both issuer key types
    return crl.issuer == ca.subject and crl.is_signature_valid(cast(CertificateIssuerPublicKeyTypes, ca.public_key()))


def _dn(cert: x509.Certificate, which: str) -> str:
    """A certificate's subject or issuer for a message; a peer's certificate may carry a name
    that cryptography parses only when it is read (and then raises ValueError)."""
    try:
        name = getattr(cert, which).rfc4514_string()
    except ValueError:
        return f"(unparseable {which})"
    return name or f"(empty {which})"

"""The hazmat half of X.509 work, so that ``migsec.pki`` never imports ``hazmat``.

``migsec.pki`` builds certificates and CRLs with ``cryptography.x509`` builders
and hands them here to be signed, encoded and fingerprinted.
"""
from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from migsec.crypto.keys import SigningKey, VerifyingKey
from migsec.errors import CryptoError, KeyLoadError

# Ed25519 issuers are refused by cryptography's path validation (web PKI profile).
CA_KINDS = ("ec-p256", "rsa-3072", "rsa-4096")


def _sign_args(key: SigningKey) -> dict[str, Any]:
    if key.kind not in CA_KINDS:
        raise CryptoError(f"a {key.kind} key cannot sign certificates; use one of {CA_KINDS}")
    args: dict[str, Any] = {"private_key": key._key, "algorithm": hashes.SHA256()}
    if key.kind.startswith("rsa-"):
        args["rsa_padding"] = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    return args


def sign_certificate(builder: x509.CertificateBuilder, key: SigningKey) -> x509.Certificate:
    """Sign a certificate builder with a CA key (ECDSA-SHA256 or RSA-PSS-SHA256)."""
    try:
        return builder.sign(**_sign_args(key))
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"certificate could not be signed: {exc}") from exc


def sign_crl(builder: x509.CertificateRevocationListBuilder, key: SigningKey) -> x509.CertificateRevocationList:
    """Sign a CRL builder with a CA key."""
    try:
        return builder.sign(**_sign_args(key))
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"CRL could not be signed: {exc}") from exc


def x509_public_key(key: SigningKey | VerifyingKey) -> Any:
    """The library public-key object, for ``CertificateBuilder.public_key`` and key identifiers."""
    return key.public_key._key if isinstance(key, SigningKey) else key._key


def certificate_public_key(cert: x509.Certificate) -> VerifyingKey:
    """The certificate's key as a VerifyingKey; unsupported kinds raise KeyLoadError."""
    try:
        pub = cert.public_key()
    except (ValueError, TypeError) as exc:
        raise KeyLoadError(f"certificate public key is unreadable: {exc}") from exc
    return VerifyingKey(pub)  # type: ignore[arg-type]


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """``SHA256:<hex>`` of the certificate's DER encoding (what peers pin)."""
    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex()  # the DER digest, computed in Rust


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)

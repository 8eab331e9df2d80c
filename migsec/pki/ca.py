"""A small certificate authority for a lab or a federation of cloud domains.

Directory layout (``DIR``, mode 0700): ``ca-key.pem`` (0600), ``ca-cert.pem``,
``revoked.json`` (serials revoked so far) and ``crl.pem`` (written by write_crl).
"""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from migsec.crypto import SigningKey, VerifyingKey
from migsec.crypto.certs import (
    CA_KINDS,
    certificate_pem,
    certificate_public_key,
    crl_pem,
    sign_certificate,
    sign_crl,
    x509_public_key,
)
from migsec.crypto.keys import KeyExistsError
from migsec.errors import CertificateError, ConfigError, CryptoError
from migsec.pki._files import read_bytes, write_atomic
from migsec.pki.names import MIGSEC_DOMAIN_EKU, did_uri, validate_did

CA_KEY = "ca-key.pem"
CA_CERT = "ca-cert.pem"
REVOKED = "revoked.json"
CRL = "crl.pem"
DOMAIN_KEY = "domain-key.pem"
DOMAIN_CERT = "domain-cert.pem"
# Domain keys must both sign (ES256/PS256) and receive JWEs, which rules out Ed25519.
DOMAIN_KINDS = ("ec-p256", "rsa-3072", "rsa-4096")
# Backdate notBefore a little so that hosts with slightly slow clocks accept new certificates.
CLOCK_SKEW = dt.timedelta(minutes=5)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_usage(*, ca: bool, kind: str) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca and kind.startswith("rsa-"),  # RSA-OAEP JWEs wrap a key
        data_encipherment=False,
        key_agreement=not ca and kind == "ec-p256",  # ECDH-ES JWEs
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def load_certificate(data: bytes, what: str = "certificate") -> x509.Certificate:
    """Parse one PEM certificate; garbage raises CertificateError naming ``what``."""
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"{what} is not a PEM X.509 certificate") from exc


class CertificateAuthority:
    """Issues domain certificates and keeps the revocation list."""

    def __init__(self, directory: Path, key: SigningKey, cert: x509.Certificate) -> None:
        self.directory = directory
        self.key = key
        self.cert = cert

    @property
    def name(self) -> str:
        attrs = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else self.cert.subject.rfc4514_string()

    @property
    def cert_pem(self) -> bytes:
        return certificate_pem(self.cert)

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        name: str,
        *,
        key_kind: str = "ec-p256",
        days: int = 3650,
        now: dt.datetime | None = None,
        force: bool = False,
    ) -> "CertificateAuthority":
        """Make a new self-signed CA in ``directory`` (refuses to replace an existing CA key)."""
        directory = Path(directory)
        if key_kind not in CA_KINDS:
            raise ConfigError(f"CA key type {key_kind!r} is not supported; use one of {', '.join(CA_KINDS)}")
        if not name or not name.strip():
            raise ConfigError("CA name is empty")
        if days < 1:
            raise ConfigError("CA validity must be at least 1 day")
        if (directory / CA_KEY).exists() and not force:
            raise KeyExistsError(f"{directory / CA_KEY} already exists; not replacing the CA (use --force)")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create CA directory {directory}: {exc.strerror}") from exc
        now = now or _utcnow()
        key = SigningKey.generate(key_kind)
        pub = x509_public_key(key)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name.strip()),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "migsec")])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True, kind=key_kind), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        )
        cert = sign_certificate(builder, key)
        key.save(directory / CA_KEY, overwrite=force)
        write_atomic(directory / CA_CERT, certificate_pem(cert))
        write_atomic(directory / REVOKED, b'{"revoked": []}\n')
        return cls(directory, key, cert)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "CertificateAuthority":
        """Open an existing CA directory made by :meth:`create`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(
                f"CA directory {directory} does not exist (pass --ca DIR, or create one with: migsec ca init {directory})"
            )
        if not (directory / CA_KEY).exists():
            raise ConfigError(f"{directory} is not a CA directory: {CA_KEY} is missing")
        key = SigningKey.load(directory / CA_KEY)
        cert = load_certificate(read_bytes(directory / CA_CERT, "CA certificate"), f"{directory / CA_CERT}")
        if key.public_key != _cert_key(cert):
            raise ConfigError(f"{directory / CA_KEY} does not belong to {directory / CA_CERT}")
        return cls(directory, key, cert)

    # --- issuing --------------------------------------------------------------------------
    def issue_domain(
        self,
        did: str,
        out_dir: str | os.PathLike[str],
        *,
        key_kind: str = "ec-p256",
        days: int = 365,
        now: dt.datetime | None = None,
        force: bool = False,
    ) -> Path:
        """Write ``domain-key.pem`` (0600), ``domain-cert.pem`` and ``ca-cert.pem`` to ``out_dir``.

        Returns the certificate path. An existing key is never replaced unless ``force``.
        """
        validate_did(did)
        if key_kind not in DOMAIN_KINDS:
            raise ConfigError(
                f"domain key type {key_kind!r} is not supported; use one of {', '.join(DOMAIN_KINDS)} "
                "(domain keys must sign and receive encrypted messages)"
            )
        if days < 1:
            raise ConfigError("certificate validity must be at least 1 day")
        out = Path(out_dir)
        if (out / DOMAIN_KEY).exists() and not force:
            raise KeyExistsError(f"{out / DOMAIN_KEY} already exists; not overwriting it (use --force)")
        try:
            out.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create output directory {out}: {exc.strerror}") from exc
        key = SigningKey.generate(key_kind)
        cert = self.sign_domain_key(did, key, days=days, now=now)
        key.save(out / DOMAIN_KEY, overwrite=force)
        write_atomic(out / DOMAIN_CERT, certificate_pem(cert))
        write_atomic(out / CA_CERT, self.cert_pem)
        return out / DOMAIN_CERT

    def sign_domain_key(
        self,
        did: str,
        key: SigningKey,
        *,
        days: int = 365,
        now: dt.datetime | None = None,
        key_usage: x509.KeyUsage | None = None,
        eku: list[x509.ObjectIdentifier] | None = None,
    ) -> x509.Certificate:
        """A domain certificate for ``key`` (``key_usage``/``eku`` overrides exist for tests)."""
        validate_did(did)
        now = now or _utcnow()
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        pub = x509_public_key(key)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(did_uri(did)), x509.DNSName(did)]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, did),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "migsec domain")]))
            .issuer_name(self.cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage or _key_usage(ca=False, kind=key.kind), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku or [MIGSEC_DOMAIN_EKU]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(x509_public_key(self.key)), critical=False)
        )
        return sign_certificate(builder, self.key)

    # --- revocation -------------------------------------------------------------------------
    def _revoked(self) -> list[dict]:
        path = self.directory / REVOKED
        if not path.exists():
            return []
        try:
            data = json.loads(read_bytes(path, "revocation list"))
            entries = data["revoked"]
            for e in entries:
                int(e["serial"], 16), dt.datetime.fromisoformat(e["date"])
            return entries
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is corrupt: {exc}") from exc

    def revoke(self, cert_pem: bytes, *, now: dt.datetime | None = None) -> int:
        """Record ``cert_pem`` as revoked; returns its serial. It must be issued by this CA."""
        cert = load_certificate(cert_pem)
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CertificateError(f"certificate was not issued by this CA ({self.name})") from exc
        if cert.serial_number == self.cert.serial_number or _is_ca(cert):
            raise CertificateError("refusing to revoke a CA certificate; revoke domain certificates only")
        entries = self._revoked()
        serial = format(cert.serial_number, "x")
        if not any(e["serial"] == serial for e in entries):
            entries.append({"serial": serial, "date": (now or _utcnow()).isoformat()})
            write_atomic(self.directory / REVOKED, json.dumps({"revoked": entries}, indent=1).encode() + b"\n")
        return cert.serial_number

    def write_crl(self, path: str | os.PathLike[str] | None = None, *, days: int = 30,
                  now: dt.datetime | None = None) -> Path:
        """Sign a CRL of every revoked serial, valid ``days`` days; default path ``DIR/crl.pem``."""
        now = now or _utcnow()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + dt.timedelta(days=days))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(x509_public_key(self.key)), critical=False)
        )
        for e in self._revoked():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(e["serial"], 16))
                .revocation_date(dt.datetime.fromisoformat(e["date"]))
                .build()
            )
        target = Path(path) if path is not None else self.directory / CRL
        write_atomic(target, crl_pem(sign_crl(builder, self.key)))
        return target


def _cert_key(cert: x509.Certificate) -> VerifyingKey:
    try:
        return certificate_public_key(cert)
    except CryptoError as exc:
        raise ConfigError(f"CA certificate key is unusable: {exc}") from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False

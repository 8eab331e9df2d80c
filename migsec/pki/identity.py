"""A domain's own identity: its key, its certificate and the DID inside it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from migsec.crypto import SigningKey, VerifyingKey
from migsec.crypto.certs import certificate_fingerprint, certificate_public_key
from migsec.errors import ConfigError
from migsec.pki._files import read_bytes
from migsec.pki.ca import load_certificate
from migsec.pki.names import did_from_certificate


@dataclass(frozen=True)
class DomainIdentity:
    did: str
    key: SigningKey
    cert_pem: bytes

    @property
    def public_key(self) -> VerifyingKey:
        return self.key.public_key

    @property
    def fingerprint(self) -> str:
        """``SHA256:<hex>`` of this domain's certificate (what peers pin)."""
        return certificate_fingerprint(load_certificate(self.cert_pem))

    @classmethod
    def load(cls, key_path: str | os.PathLike[str], cert_path: str | os.PathLike[str]) -> "DomainIdentity":
        """Load ``domain-key.pem`` (must be 0600) and ``domain-cert.pem``, and check they match."""
        key = SigningKey.load(key_path)
        cert_pem = read_bytes(Path(cert_path), "domain certificate")
        cert = load_certificate(cert_pem, f"domain certificate {cert_path}")
        if certificate_public_key(cert) != key.public_key:
            raise ConfigError(f"{key_path} is not the key of certificate {cert_path}")
        return cls(did_from_certificate(cert), key, cert_pem)

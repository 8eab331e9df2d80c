"""Long-term signing keys (domain and CA keys): Ed25519, ECDSA P-256, RSA-PSS >= 3072.

ECDSA signatures from :meth:`SigningKey.sign` are the fixed-size raw ``r || s``
(64 bytes), the form JOSE ES256 uses, so that binary messages have fixed-size
fields. RSA uses PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt (as JOSE PS256).
Key files are unencrypted PKCS#8 PEM protected by file mode 0600.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Union, cast

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from migsec.errors import CryptoError, KeyLoadError, SignatureError
from migsec.fsutil import atomic_write

KINDS = ("ec-p256", "ed25519", "rsa-3072", "rsa-4096")
MIN_RSA_BITS = 3072
_P256_SIZE = 32

PrivateKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey]
PublicKey = Union[ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, rsa.RSAPublicKey]


class KeyExistsError(CryptoError):
    """A key file already exists and overwriting was not asked for."""


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


# Immutable parameter objects, built once: constructing them (and isinstance checks against the
# key ABCs) cost a noticeable share of a sign or verify on the handshake path.
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_SHA256 = hashes.SHA256()
_PSS = _pss()


def _kind_of(key: PrivateKey | PublicKey) -> str:
    """Map a library key object to a migsec kind; refuse anything else."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyLoadError(f"EC curve {key.curve.name} is not supported; use P-256")
        return "ec-p256"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        if key.key_size < MIN_RSA_BITS:
            raise KeyLoadError(f"RSA key of {key.key_size} bits is too small; need >= {MIN_RSA_BITS}")
        return f"rsa-{key.key_size}"
    raise KeyLoadError(f"unsupported key type {type(key).__name__}")


_JOSE_ALG = {"ec-p256": "ES256", "ed25519": "Ed25519"}


def _jose_alg(kind: str) -> str:
    return _JOSE_ALG.get(kind, "PS256")


class VerifyingKey:
    """A public key that checks signatures and receives JWEs."""

    # _der and _jose are derived once per key object: a handshake uses the same key several
    # times (hash, fingerprint, JWS verify, JWE encrypt) and rebuilding them dominated its cost.
    __slots__ = ("kind", "_key", "_der", "_jose")

    def __init__(self, key: PublicKey) -> None:
        self.kind = _kind_of(key)
        self._key = key
        self._der: bytes | None = None
        self._jose = None  # the joserfc key object, filled by migsec.crypto.envelope

    def __repr__(self) -> str:
        return f"VerifyingKey({self.kind!r}, {self.fingerprint})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyingKey) and self.to_der() == other.to_der()

    def __hash__(self) -> int:
        return hash(self.to_der())

    @property
    def jose_alg(self) -> str:
        """The JWS algorithm this key verifies (ES256, Ed25519 or PS256)."""
        return _jose_alg(self.kind)

    @classmethod
    def from_pem(cls, data: bytes) -> "VerifyingKey":
        """Load a SubjectPublicKeyInfo PEM; bad input raises KeyLoadError."""
        try:
            key = serialization.load_pem_public_key(bytes(data))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyLoadError("not a usable PEM public key") from exc
        return cls(key)  # type: ignore[arg-type]

    def to_pem(self) -> bytes:
        return self._key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def to_der(self) -> bytes:
        if self._der is None:
            self._der = self._key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return self._der

    @property
    def fingerprint(self) -> str:
        """``SHA256:<hex>`` of the DER SubjectPublicKeyInfo."""
        return "SHA256:" + hashlib.sha256(self.to_der()).hexdigest()

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise SignatureError unless ``signature`` is this key's signature over ``data``."""
        if not isinstance(signature, (bytes, bytearray)) or not isinstance(data, (bytes, bytearray)):
            raise SignatureError("signature and data must be bytes")
        try:
            key = self._key
            if self.kind == "ed25519":
                cast(ed25519.Ed25519PublicKey, key).verify(bytes(signature), bytes(data))
            elif self.kind == "ec-p256":
                if len(signature) != 2 * _P256_SIZE:
                    raise SignatureError("signature did not verify")
                r = int.from_bytes(signature[:_P256_SIZE], "big")
                s = int.from_bytes(signature[_P256_SIZE:], "big")
                cast(ec.EllipticCurvePublicKey, key).verify(encode_dss_signature(r, s), bytes(data), _ECDSA_SHA256)
            else:
                cast(rsa.RSAPublicKey, key).verify(bytes(signature), bytes(data), _PSS, _SHA256)
        except (InvalidSignature, ValueError) as exc:
            raise SignatureError("signature did not verify") from exc


class SigningKey:
    """A private key that signs and decrypts JWEs addressed to it."""

    __slots__ = ("kind", "_key", "_public", "_jose")

    def __init__(self, key: PrivateKey) -> None:
        self.kind = _kind_of(key)
        self._key = key
        self._public: VerifyingKey | None = None
        self._jose = None  # the joserfc key object, filled by migsec.crypto.envelope

    def __repr__(self) -> str:  # never print key material
        return f"SigningKey({self.kind!r}, {self.public_key.fingerprint})"

    @classmethod
    def generate(cls, kind: str = "ec-p256") -> "SigningKey":
        """A fresh key: "ec-p256" (default), "ed25519", "rsa-3072" or "rsa-4096"."""
        if kind == "ec-p256":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        if kind == "ed25519":
            return cls(ed25519.Ed25519PrivateKey.generate())
        if kind in ("rsa-3072", "rsa-4096"):
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=int(kind[4:])))
        raise CryptoError(f"unknown key kind {kind!r}; expected one of {KINDS}")

    @property
    def jose_alg(self) -> str:
        """The JWS algorithm this key signs with (ES256, Ed25519 or PS256)."""
        return _jose_alg(self.kind)

    @property
    def public_key(self) -> VerifyingKey:
        if self._public is None:
            self._public = VerifyingKey(self._key.public_key())
        return self._public

    @classmethod
    def from_pem(cls, data: bytes) -> "SigningKey":
        """Load an unencrypted PKCS#8/traditional PEM private key; bad input -> KeyLoadError."""
        try:
            key = serialization.load_pem_private_key(bytes(data), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyLoadError("not a usable unencrypted PEM private key") from exc
        return cls(key)  # type: ignore[arg-type]

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SigningKey":
        """Load a key file; refuse it when group or others may read or write it."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise KeyLoadError(f"cannot open key file {path}: {exc.strerror}") from exc
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise KeyLoadError(f"key file {path} is not a regular file")
            if mode & 0o077:
                raise KeyLoadError(
                    f"key file {path} has mode {stat.S_IMODE(mode):04o}; it must not be "
                    f"accessible by group or others (chmod 600 {path})"
                )
            with os.fdopen(fd, "rb") as fh:
                fd = -1
                data = fh.read(1 << 20)
        finally:
            if fd >= 0:
                os.close(fd)
        try:
            return cls.from_pem(data)
        except KeyLoadError as exc:
            raise KeyLoadError(f"key file {path}: {exc}") from exc

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the key as PEM with mode 0600 (atomically; refuses to overwrite unless asked)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise KeyExistsError(f"key file {path} already exists; not overwriting it")
        try:
            # overwrite=False links instead of renaming: fails if another writer created the
            # key meanwhile
            atomic_write(path, self.to_pem(), mode=0o600, overwrite=overwrite)
        except FileExistsError as exc:
            raise KeyExistsError(f"key file {path} already exists; not overwriting it") from exc
        except OSError as exc:
            raise CryptoError(f"cannot write key file {path}: {exc.strerror}") from exc

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` (ECDSA P-256 returns fixed 64-byte r||s; RSA uses PSS-SHA-256)."""
        key = self._key
        if self.kind == "ed25519":
            return cast(ed25519.Ed25519PrivateKey, key).sign(bytes(data))
        if self.kind == "ec-p256":
            r, s = decode_dss_signature(cast(ec.EllipticCurvePrivateKey, key).sign(bytes(data), _ECDSA_SHA256))
            return r.to_bytes(_P256_SIZE, "big") + s.to_bytes(_P256_SIZE, "big")
        return cast(rsa.RSAPrivateKey, key).sign(bytes(data), _PSS, _SHA256)

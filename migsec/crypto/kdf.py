"""Key derivation and hashing: HKDF-SHA-256, scrypt, SHA-256, OS randomness."""
from __future__ import annotations

import hashlib
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from migsec.errors import CryptoError


def hkdf_sha256(ikm: bytes, *, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF with SHA-256 (extract + expand)."""
    if not 1 <= length <= 255 * 32:
        raise CryptoError(f"HKDF-SHA-256 length must be 1..{255 * 32}, got {length}")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def scrypt_key(
    password: bytes | str, salt: bytes, *, n: int = 2**15, r: int = 8, p: int = 1, length: int = 32
) -> bytes:
    """Memory-hard key from a password (SK1 in the paper). ``n`` must be a power of two."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    if len(salt) < 16:
        raise CryptoError("scrypt salt must be at least 16 bytes")
    try:
        return Scrypt(salt=salt, length=length, n=n, r=r, p=p).derive(password)
    except (ValueError, MemoryError) as exc:
        raise CryptoError(f"scrypt parameters rejected (n={n}, r={r}, p={p}): {exc}") from exc


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the OS CSPRNG."""
    if n < 0:
        raise CryptoError("random_bytes needs n >= 0")
    return os.urandom(n)


def sha256(data: bytes) -> bytes:
    """SHA-256 digest (32 bytes)."""
    return hashlib.sha256(data).digest()

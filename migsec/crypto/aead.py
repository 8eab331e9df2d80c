"""AEAD records: AES-256-GCM and ChaCha20-Poly1305 with a fixed 12-byte nonce.

The ``*_into`` variants write into a caller-owned buffer, so the record layer
can reuse one buffer per direction instead of allocating per record (2-3x
faster at >= 256 KiB records, see FACTS.md).
"""
from __future__ import annotations

from typing import Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from migsec.errors import CryptoError, DecryptionError

NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32

_ALGORITHMS: dict[str, type[AESGCM] | type[ChaCha20Poly1305]] = {
    "aes-256-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305,
}

Buffer = bytes | bytearray | memoryview


class Aead:
    """One AEAD key. ``algorithm`` is ``"aes-256-gcm"`` or ``"chacha20-poly1305"``."""

    __slots__ = ("algorithm", "_cipher")
    _cipher: Union[AESGCM, ChaCha20Poly1305]

    def __init__(self, algorithm: str, key: bytes) -> None:
        cls = _ALGORITHMS.get(algorithm)
        if cls is None:
            raise CryptoError(
                f"unknown AEAD algorithm {algorithm!r}; expected one of {sorted(_ALGORITHMS)}"
            )
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
            raise CryptoError(f"{algorithm} needs a {KEY_SIZE}-byte key")
        self.algorithm = algorithm
        self._cipher = cls(bytes(key))

    def __repr__(self) -> str:  # never show the key
        return f"Aead({self.algorithm!r}, <key>)"

    @staticmethod
    def _check_nonce(nonce: Buffer) -> None:
        if len(nonce) != NONCE_SIZE:
            raise CryptoError(f"AEAD nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")

    def seal(self, nonce: Buffer, plaintext: Buffer, aad: Buffer | None) -> bytes:
        """Encrypt and authenticate; returns ciphertext || tag."""
        self._check_nonce(nonce)
        return self._cipher.encrypt(nonce, plaintext, aad)

    def open(self, nonce: Buffer, ciphertext: Buffer, aad: Buffer | None) -> bytes:
        """Check and decrypt; any failure raises the opaque DecryptionError."""
        self._check_nonce(nonce)
        try:
            return self._cipher.decrypt(nonce, ciphertext, aad)
        except (InvalidTag, ValueError, TypeError) as exc:
            raise DecryptionError("decryption failed") from exc

    def seal_into(self, nonce: Buffer, plaintext: Buffer, aad: Buffer | None, out: bytearray | memoryview) -> int:
        """Encrypt into ``out`` (at least len(plaintext) + TAG_SIZE bytes); returns bytes written."""
        self._check_nonce(nonce)
        n = len(plaintext) + TAG_SIZE
        if len(out) < n:
            raise CryptoError(f"output buffer too small: {len(out)} < {n}")
        view = memoryview(out)[:n]
        return self._cipher.encrypt_into(nonce, plaintext, aad, view)

    def open_into(self, nonce: Buffer, ciphertext: Buffer, aad: Buffer | None, out: bytearray | memoryview) -> int:
        """Check and decrypt into ``out``; returns bytes written. Failure -> DecryptionError.

        On failure ``out`` may hold garbage: callers must not use it.
        """
        self._check_nonce(nonce)
        n = len(ciphertext) - TAG_SIZE
        if n < 0:
            raise DecryptionError("decryption failed")
        if len(out) < n:
            raise CryptoError(f"output buffer too small: {len(out)} < {n}")
        view = memoryview(out)[:n]
        try:
            return self._cipher.decrypt_into(nonce, ciphertext, aad, view)
        except (InvalidTag, ValueError, TypeError) as exc:
            raise DecryptionError("decryption failed") from exc

"""Narrow, typed doors to ``cryptography`` and JOSE (``joserfc``).

This package is the only importer of ``cryptography.hazmat`` and ``joserfc`` in
migsec. Every failure leaves it as a :mod:`migsec.errors` exception.
"""
from migsec.crypto.aead import NONCE_SIZE, TAG_SIZE, Aead
from migsec.crypto.ecdh import EphemeralKey
from migsec.crypto.kdf import hkdf_sha256, random_bytes, scrypt_key, sha256
from migsec.crypto.keys import SigningKey, VerifyingKey

__all__ = [
    "Aead",
    "NONCE_SIZE",
    "TAG_SIZE",
    "EphemeralKey",
    "SigningKey",
    "VerifyingKey",
    "hkdf_sha256",
    "random_bytes",
    "scrypt_key",
    "sha256",
]

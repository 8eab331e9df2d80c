"""Ephemeral ECDH (X25519 or P-256) for the handshake's eA / eB.

Public keys travel as raw bytes: 32 bytes for X25519, the 65-byte uncompressed
point for P-256.
"""
from __future__ import annotations

from typing import cast

from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from migsec.errors import CryptoError

CURVES = ("x25519", "p256")


class EphemeralKey:
    """A single-use key pair; use it for one exchange, then drop it."""

    __slots__ = ("curve", "_private")

    def __init__(self, curve: str, private: x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey) -> None:
        self.curve = curve
        self._private = private

    def __repr__(self) -> str:
        return f"EphemeralKey({self.curve!r})"

    @classmethod
    def generate(cls, curve: str = "x25519") -> "EphemeralKey":
        """A fresh key pair on ``curve`` ("x25519" or "p256")."""
        if curve == "x25519":
            return cls(curve, x25519.X25519PrivateKey.generate())
        if curve == "p256":
            return cls(curve, ec.generate_private_key(ec.SECP256R1()))
        raise CryptoError(f"unknown ECDH curve {curve!r}; expected one of {CURVES}")

    def public_bytes(self) -> bytes:
        """The public key in its raw wire form."""
        if self.curve == "x25519":
            return self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return self._private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)

    def exchange(self, peer_public: bytes) -> bytes:
        """The shared secret with ``peer_public``; an invalid point raises CryptoError."""
        if not isinstance(peer_public, (bytes, bytearray)):
            raise CryptoError("peer ECDH public key must be bytes")
        try:
            if self.curve == "x25519":
                if len(peer_public) != 32:
                    raise ValueError("X25519 public key must be 32 bytes")
                peer = x25519.X25519PublicKey.from_public_bytes(bytes(peer_public))
                # cryptography raises ValueError on the all-zero (small-order) result
                return cast(x25519.X25519PrivateKey, self._private).exchange(peer)
            if len(peer_public) != 65:
                raise ValueError("P-256 public key must be a 65-byte uncompressed point")
            point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(peer_public))
            return cast(ec.EllipticCurvePrivateKey, self._private).exchange(ec.ECDH(), point)
        except ValueError as exc:
            raise CryptoError(f"invalid {self.curve} peer public key: {exc}") from exc

"""Signing keys: sign/verify per kind, PEM round trips, key file permissions."""
from __future__ import annotations

import os
import stat

import pytest

from migsec.crypto import SigningKey, VerifyingKey
from migsec.crypto.keys import KeyExistsError
from migsec.errors import CryptoError, KeyLoadError, SignatureError

KINDS = ["ec-p256", "ed25519", "rsa-3072"]


@pytest.mark.parametrize("kind", KINDS)
def test_sign_verify(keys, kind):
    k = keys[kind]
    sig = k.sign(b"Authr_Tkt body")
    k.public_key.verify(sig, b"Authr_Tkt body")
    if kind == "ec-p256":
        assert len(sig) == 64  # fixed-size r||s, not DER
    with pytest.raises(SignatureError):
        k.public_key.verify(sig, b"Authr_Tkt bodY")
    bad = bytearray(sig)
    bad[len(bad) // 2] ^= 0x80
    with pytest.raises(SignatureError):
        k.public_key.verify(bytes(bad), b"Authr_Tkt body")
    other = next(keys[x] for x in KINDS if x != kind)
    with pytest.raises(SignatureError):
        other.public_key.verify(sig, b"Authr_Tkt body")
    with pytest.raises(SignatureError):
        k.public_key.verify(b"", b"Authr_Tkt body")


@pytest.mark.parametrize("kind", KINDS)
def test_pem_round_trip(keys, kind):
    k = keys[kind]
    k2 = SigningKey.from_pem(k.to_pem())
    assert k2.kind == kind and k2.public_key == k.public_key
    pub = VerifyingKey.from_pem(k.public_key.to_pem())
    pub.verify(k2.sign(b"m"), b"m")
    assert pub.fingerprint.startswith("SHA256:") and len(pub.fingerprint) == 7 + 64
    assert pub.jose_alg == k.jose_alg == {"ec-p256": "ES256", "ed25519": "Ed25519", "rsa-3072": "PS256"}[kind]
    assert "PRIVATE" not in repr(k) and "BEGIN" not in repr(k)


def test_small_rsa_and_other_curves_refused():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    small = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyLoadError, match="2048 bits is too small"):
        SigningKey.from_pem(small)
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyLoadError, match="secp384r1"):
        VerifyingKey.from_pem(p384)
    with pytest.raises(CryptoError, match="unknown key kind"):
        SigningKey.generate("dsa")


def test_save_is_0600_and_load_refuses_loose_modes(tmp_path, keys):
    k = keys["ec-p256"]
    path = tmp_path / "domain-key.pem"
    k.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SigningKey.load(path).public_key == k.public_key
    with pytest.raises(KeyExistsError, match="already exists"):
        SigningKey.generate("ed25519").save(path)
    assert SigningKey.load(path).public_key == k.public_key  # untouched
    SigningKey.generate("ed25519").save(path, overwrite=True)
    assert SigningKey.load(path).kind == "ed25519"
    for mode in (0o644, 0o640, 0o604):
        os.chmod(path, mode)
        with pytest.raises(KeyLoadError, match=f"{mode:04o}.*chmod 600"):
            SigningKey.load(path)
    with pytest.raises(KeyLoadError, match="cannot open"):
        SigningKey.load(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    os.chmod(garbage, 0o600)
    with pytest.raises(KeyLoadError, match="garbage.pem"):
        SigningKey.load(garbage)

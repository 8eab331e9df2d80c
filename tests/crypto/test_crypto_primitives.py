"""AEAD, KDF and ECDH: known answers, round trips, tamper rejection."""
from __future__ import annotations

import pytest

from migsec.crypto import NONCE_SIZE, TAG_SIZE, Aead, EphemeralKey, hkdf_sha256, random_bytes, scrypt_key, sha256
from migsec.errors import CryptoError, DecryptionError

ALGS = ["aes-256-gcm", "chacha20-poly1305"]
h = bytes.fromhex


def test_hkdf_rfc5869(vectors):
    for v in vectors["hkdf"]:
        salt = h(v["salt"]) or None  # RFC: an absent salt is HashLen zero bytes
        out = hkdf_sha256(h(v["ikm"]), salt=salt, info=h(v["info"]), length=v["length"])
        assert out.hex() == v["okm"], v["name"]


def test_aead_known_answers(vectors):
    for v in vectors["aead"]:
        a = Aead(v["algorithm"], h(v["key"]))
        aad = h(v["aad"])
        sealed = a.seal(h(v["nonce"]), h(v["plaintext"]), aad)
        assert sealed.hex() == v["ciphertext"] + v["tag"], v["name"]
        assert a.open(h(v["nonce"]), sealed, aad) == h(v["plaintext"])
        out = bytearray(len(sealed) + 7)  # larger than needed: *_into uses a prefix
        n = a.seal_into(h(v["nonce"]), h(v["plaintext"]), aad, out)
        assert bytes(out[:n]) == sealed
        back = bytearray(len(sealed))
        m = a.open_into(h(v["nonce"]), sealed, aad, back)
        assert bytes(back[:m]) == h(v["plaintext"])


@pytest.mark.parametrize("alg", ALGS)
def test_aead_rejects_any_tampering(alg):
    a = Aead(alg, random_bytes(32))
    nonce, aad, msg = random_bytes(NONCE_SIZE), b"stream=1;offset=0", random_bytes(300)
    sealed = a.seal(nonce, msg, aad)
    assert len(sealed) == len(msg) + TAG_SIZE
    for i in (0, len(msg) // 2, len(sealed) - 1):  # body and tag
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(DecryptionError):
            a.open(nonce, bytes(bad), aad)
        with pytest.raises(DecryptionError):
            a.open_into(nonce, bytes(bad), aad, bytearray(len(sealed)))
    with pytest.raises(DecryptionError):
        a.open(nonce, sealed, b"stream=1;offset=1")  # AAD bound
    with pytest.raises(DecryptionError):
        a.open(bytes(NONCE_SIZE), sealed, aad)  # nonce bound
    with pytest.raises(DecryptionError):
        Aead(alg, random_bytes(32)).open(nonce, sealed, aad)  # key bound
    with pytest.raises(DecryptionError):
        a.open_into(nonce, sealed[:5], aad, bytearray(64))  # shorter than a tag


def test_aead_input_errors():
    with pytest.raises(CryptoError, match="unknown AEAD algorithm"):
        Aead("aes-128-cbc", bytes(32))
    with pytest.raises(CryptoError, match="32-byte key"):
        Aead("aes-256-gcm", bytes(16))
    a = Aead("aes-256-gcm", bytes(32))
    with pytest.raises(CryptoError, match="nonce must be 12"):
        a.seal(bytes(8), b"x", None)
    with pytest.raises(CryptoError, match="too small"):
        a.seal_into(bytes(12), b"hello", None, bytearray(10))
    assert "key" in repr(a) and "00" not in repr(a)


def test_scrypt_and_sha256():
    salt = b"s" * 16
    k1 = scrypt_key("correct horse", salt, n=2**10)
    assert len(k1) == 32
    assert scrypt_key(b"correct horse", salt, n=2**10) == k1  # str and utf-8 bytes agree
    assert scrypt_key("correct horsf", salt, n=2**10) != k1
    assert scrypt_key("correct horse", b"t" * 16, n=2**10) != k1
    with pytest.raises(CryptoError, match="salt"):
        scrypt_key("pw", b"short")
    with pytest.raises(CryptoError, match="scrypt parameters"):
        scrypt_key("pw", salt, n=1000)  # not a power of two
    # FIPS 180-2 "abc"
    assert sha256(b"abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("curve", ["x25519", "p256"])
def test_ecdh_agreement(curve):
    a, b = EphemeralKey.generate(curve), EphemeralKey.generate(curve)
    s1, s2 = a.exchange(b.public_bytes()), b.exchange(a.public_bytes())
    assert s1 == s2 and len(s1) == 32
    assert a.exchange(EphemeralKey.generate(curve).public_bytes()) != s1


@pytest.mark.parametrize("curve", ["x25519", "p256"])
def test_ecdh_rejects_bad_points(curve):
    k = EphemeralKey.generate(curve)
    size = 32 if curve == "x25519" else 65
    with pytest.raises(CryptoError, match="invalid"):
        k.exchange(b"\x04" * (size - 1))
    if curve == "p256":
        bad = bytearray(EphemeralKey.generate("p256").public_bytes())
        bad[-1] ^= 1  # almost surely no longer on the curve
        with pytest.raises(CryptoError, match="invalid"):
            k.exchange(bytes(bad))
    else:
        with pytest.raises(CryptoError, match="invalid"):
            k.exchange(bytes(32))  # small-order point: all-zero shared secret
    with pytest.raises(CryptoError, match="unknown ECDH curve"):
        EphemeralKey.generate("p384")

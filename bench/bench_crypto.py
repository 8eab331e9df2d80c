"""Crypto figures on this machine: AEAD allocating vs *_into, signatures, JOSE, chain verify.

Run by hand: .venv/bin/python bench/bench_crypto.py   (prints; asserts nothing)
"""
from __future__ import annotations

import datetime as dt
import tempfile
import time
from pathlib import Path

from migsec.crypto import Aead, EphemeralKey, SigningKey, hkdf_sha256, random_bytes
from migsec.crypto.envelope import jwe_decrypt, jwe_encrypt, jwe_encrypt_dir, jws_sign, jws_verify
from migsec.pki import CertificateAuthority, TrustStore


def per_call(fn, n: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def aead_throughput(alg: str, size: int, total: int = 256 << 20) -> tuple[float, float]:
    a = Aead(alg, random_bytes(32))
    nonce, data = bytes(12), random_bytes(size)
    n = max(1, total // size)
    sealed = a.seal(nonce, data, b"aad")
    alloc = per_call(lambda: a.open(nonce, a.seal(nonce, data, b"aad"), b"aad"), n)
    enc_buf, dec_buf = bytearray(size + 16), bytearray(size)
    into = per_call(lambda: (a.seal_into(nonce, data, b"aad", enc_buf), a.open_into(nonce, sealed, b"aad", dec_buf)), n)
    return size / alloc / 1e9, size / into / 1e9


def main() -> None:
    print("AEAD encrypt+decrypt, GB/s (allocating / *_into)")
    for alg in ("aes-256-gcm", "chacha20-poly1305"):
        for size in (64 << 10, 1 << 20, 4 << 20):
            a, b = aead_throughput(alg, size)
            print(f"  {alg:18s} {size >> 10:5d} KiB  {a:5.2f} / {b:5.2f}  ({b / a:.1f}x)")
    print("signatures, µs (sign / verify)")
    msg = random_bytes(200)
    for kind in ("ec-p256", "ed25519", "rsa-3072"):
        k = SigningKey.generate(kind)
        sig = k.sign(msg)
        print(f"  {kind:9s} {per_call(lambda: k.sign(msg), 200) * 1e6:8.0f} / "
              f"{per_call(lambda: k.public_key.verify(sig, msg), 200) * 1e6:8.0f}")
    print("ECDH keygen + exchange, µs")
    for curve in ("x25519", "p256"):
        peer = EphemeralKey.generate(curve).public_bytes()
        print(f"  {curve:7s} {per_call(lambda: EphemeralKey.generate(curve).exchange(peer), 300) * 1e6:8.0f}")
    print(f"HKDF-SHA-256, µs  {per_call(lambda: hkdf_sha256(b'k' * 32, salt=b's' * 32, info=b'i'), 2000) * 1e6:.1f}")
    k = SigningKey.generate("ec-p256")
    claims = {"iss": "cloud-a.example", "aud": "cloud-b.example", "nonce": "x" * 22, "exp": 1_800_000_000}
    token = jws_sign(claims, k)
    body = random_bytes(400)
    jwe = jwe_encrypt(body, k.public_key)
    print("JOSE, µs (and bytes)")
    print(f"  JWS ES256 sign / verify      {per_call(lambda: jws_sign(claims, k), 200) * 1e6:6.0f} / "
          f"{per_call(lambda: jws_verify(token, k.public_key), 200) * 1e6:6.0f}   ({len(token)} B)")
    print(f"  JWE ECDH-ES/A256GCM enc / dec {per_call(lambda: jwe_encrypt(body, k.public_key), 200) * 1e6:6.0f} / "
          f"{per_call(lambda: jwe_decrypt(jwe, k), 200) * 1e6:6.0f}   ({len(jwe)} B for 400 B)")
    print(f"  JWE dir/A256GCM size         {len(jwe_encrypt_dir(body, random_bytes(32)))} B for 400 B")
    with tempfile.TemporaryDirectory() as d:
        ca = CertificateAuthority.create(Path(d) / "ca", "Bench CA")
        pem = ca.issue_domain("cloud-b.example", Path(d) / "b").read_bytes()
        store = TrustStore.from_pem([ca.cert_pem])
        now = dt.datetime.now(dt.timezone.utc)
        t = per_call(lambda: store.verify(pem, expected_did="cloud-b.example", at=now), 300)
        print(f"TrustStore.verify (CA + leaf, with DID/KU/EKU validators), µs  {t * 1e6:.0f}")


if __name__ == "__main__":
    main()

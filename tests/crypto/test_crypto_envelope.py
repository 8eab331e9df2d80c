"""JOSE envelopes: round trips, algorithm pinning, tampering, and fuzzed decoders."""
from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migsec.crypto import SigningKey, VerifyingKey, random_bytes
from migsec.crypto.envelope import (
    jwe_decrypt,
    jwe_decrypt_dir,
    jwe_encrypt,
    jwe_encrypt_dir,
    jwe_header,
    jws_peek,
    jws_sign,
    jws_verify,
)
from migsec.errors import CryptoError, DecryptionError, MalformedMessageError, MigsecError, SignatureError


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


CLAIMS = {"iss": "cloud-a.example", "aud": "cloud-b.example", "nonce": "n1", "exp": 1_800_000_000}


@pytest.mark.parametrize("kind", ["ec-p256", "ed25519", "rsa-3072"])
def test_jws_round_trip_and_tamper(keys, kind):
    k = keys[kind]
    token = jws_sign(CLAIMS, k, kid="a1", typ="migsec-authr+jwt")
    assert jws_verify(token, k.public_key) == CLAIMS
    header, claims = jws_peek(token)
    assert header == {"alg": k.jose_alg, "kid": "a1", "typ": "migsec-authr+jwt"} and claims == CLAIMS
    h, p, s = token.split(".")
    forged = b64(json.dumps({**CLAIMS, "aud": "evil.example"}).encode())
    with pytest.raises(SignatureError):
        jws_verify(f"{h}.{forged}.{s}", k.public_key)
    with pytest.raises(SignatureError):
        jws_verify(f"{h}.{p}.{s[:-4]}AAAA", k.public_key)
    other = SigningKey.generate("ec-p256") if kind != "ec-p256" else keys["ed25519"]
    with pytest.raises(SignatureError):
        jws_verify(token, other.public_key)


def test_jws_refuses_alg_none_and_hmac_confusion(keys):
    pub = keys["ec-p256"].public_key
    payload = b64(json.dumps(CLAIMS).encode())
    none = b64(b'{"alg":"none"}') + "." + payload + "."
    with pytest.raises(SignatureError, match="algorithm"):
        jws_verify(none, pub)
    # HS256 keyed with the public key PEM: the classic confusion attack
    import hashlib
    import hmac

    head = b64(b'{"alg":"HS256"}')
    mac = hmac.new(pub.to_pem(), f"{head}.{payload}".encode(), hashlib.sha256).digest()
    with pytest.raises(SignatureError, match="algorithm"):
        jws_verify(f"{head}.{payload}.{b64(mac)}", pub)


def test_jws_malformed(keys):
    pub = keys["ec-p256"].public_key
    for bad in ["", "a.b", "a.b.c.d", "!!.!!.!!", b"\xff\xfe.a.b", f"{b64(b'[1]')}.{b64(b'{}')}.AA"]:
        with pytest.raises(MalformedMessageError):
            jws_verify(bad, pub)
    dup = b64(b'{"alg":"ES256","alg":"none"}')
    with pytest.raises(MalformedMessageError, match="duplicate"):
        jws_peek(f"{dup}.{b64(b'{}')}.AA")
    with pytest.raises(CryptoError, match="JSON-serializable"):
        jws_sign({"t": object()}, keys["ec-p256"])


@pytest.mark.parametrize("kind", ["ec-p256", "rsa-3072"])
def test_jwe_to_public_key(keys, kind):
    k = keys[kind]
    msg = b"Mig_Rqst || Src_DID || Dest_DID || eA || NonceA"
    token = jwe_encrypt(msg, k.public_key, kid="b1")
    assert jwe_header(token)["alg"] == {"ec-p256": "ECDH-ES", "rsa-3072": "RSA-OAEP-256"}[kind]
    assert jwe_header(token)["enc"] == "A256GCM" and msg not in token.encode()
    assert jwe_decrypt(token, k) == msg
    parts = token.split(".")
    ct = bytearray(base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4)))
    ct[0] ^= 1
    parts[3] = b64(bytes(ct))
    with pytest.raises(DecryptionError):
        jwe_decrypt(".".join(parts), k)
    with pytest.raises(DecryptionError):
        jwe_decrypt(token, SigningKey.generate("ec-p256") if kind == "ec-p256" else keys["ec-p256"])


def test_jwe_refuses_ed25519_recipient(keys):
    with pytest.raises(CryptoError, match="cannot receive"):
        jwe_encrypt(b"x", keys["ed25519"].public_key)


def test_jwe_dir_round_trip_and_refusals():
    key = random_bytes(32)
    token = jwe_encrypt_dir(b"UserID, SK2, Nonce2, expiry", key, kid="sk3-2026")
    assert jwe_decrypt_dir(token, key) == b"UserID, SK2, Nonce2, expiry"
    with pytest.raises(DecryptionError):
        jwe_decrypt_dir(token, random_bytes(32))
    with pytest.raises(CryptoError, match="32 bytes"):
        jwe_decrypt_dir(token, b"short")
    # A header edit breaks the AAD (the protected header is authenticated)
    parts = token.split(".")
    parts[0] = b64(b'{"alg":"dir","enc":"A256GCM","kid":"other"}')
    with pytest.raises(DecryptionError):
        jwe_decrypt_dir(".".join(parts), key)


def test_jwe_dir_refuses_compression():
    """A ``zip`` header would let a sender make us inflate a bomb: refused before decryption."""
    from joserfc import jwe
    from joserfc.jwk import OctKey

    key = random_bytes(32)
    token = jwe.encrypt_compact({"alg": "dir", "enc": "A256GCM", "zip": "DEF"}, b"a" * 1000, OctKey.import_key(key))
    with pytest.raises(DecryptionError):
        jwe_decrypt_dir(token, key)


# --- fuzz: decoders raise only migsec errors ------------------------------------------------
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DIR_KEY = bytes(range(32))


def _segments() -> st.SearchStrategy[str]:
    part = st.one_of(
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=60),
        st.binary(max_size=40).map(b64),
        st.dictionaries(st.sampled_from(["alg", "enc", "kid", "epk", "zip", "crit", "typ"]),
                        st.one_of(st.text(max_size=10), st.integers(), st.none(),
                                  st.sampled_from(["ES256", "dir", "A256GCM", "ECDH-ES", "ECDH-ES+A256KW", "none", "HS256"])),
                        max_size=4).map(lambda d: b64(json.dumps(d).encode())),
    )
    return st.lists(part, min_size=1, max_size=6).map(".".join)


tokens = st.one_of(st.binary(max_size=300), st.text(max_size=300), _segments())


@FUZZ
@given(tokens)
def test_fuzz_jws_verify(keys, token):
    with pytest.raises(MigsecError):
        jws_verify(token, keys["ec-p256"].public_key)


@FUZZ
@given(tokens)
def test_fuzz_jwe_decrypt(keys, token):
    with pytest.raises(MigsecError):
        jwe_decrypt(token, keys["ec-p256"])


@FUZZ
@given(tokens)
def test_fuzz_jwe_decrypt_dir(token):
    with pytest.raises(MigsecError):
        jwe_decrypt_dir(token, DIR_KEY)


@FUZZ
@given(st.one_of(st.binary(max_size=400),
                 st.binary(max_size=300).map(lambda b: b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(b) + b"-----END PUBLIC KEY-----\n")))
def test_fuzz_verifying_key_from_pem(data):
    with pytest.raises(MigsecError):
        VerifyingKey.from_pem(data)


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_tokens(keys, data):
    """Single-byte mutations of real tokens: refused, never a library exception."""
    k = keys["ec-p256"]
    token = data.draw(st.sampled_from([
        jws_sign(CLAIMS, k), jwe_encrypt(b"secret", k.public_key), jwe_encrypt_dir(b"secret", DIR_KEY)]))
    i = data.draw(st.integers(0, len(token) - 1))
    c = data.draw(st.sampled_from("A_-.9z=+/ \x00"))
    mutated = token[:i] + c + token[i + 1:]
    if mutated == token:
        return
    for fn in (lambda t: jws_verify(t, k.public_key), lambda t: jwe_decrypt(t, k), lambda t: jwe_decrypt_dir(t, DIR_KEY)):
        try:
            fn(mutated)
        except MigsecError:
            pass


def test_unexpected_header_members_refused(keys):
    """crit / b64 / jwk / jku change how a library reads the token: refused up front."""
    k = keys["ec-p256"]
    _, p, s = jws_sign(CLAIMS, k).split(".")
    for extra in ({"b64": False, "crit": ["b64"]}, {"jwk": {"kty": "EC"}}, {"jku": "https://evil.example/k"}):
        head = b64(json.dumps({"alg": "ES256", **extra}).encode())
        with pytest.raises(MalformedMessageError, match="unsupported members"):
            jws_verify(f"{head}.{p}.{s}", k.public_key)
    parts = jwe_encrypt(b"x", k.public_key).split(".")
    header = jwe_header(".".join(parts))
    parts[0] = b64(json.dumps({**header, "jku": "https://evil.example/k"}).encode())
    with pytest.raises(DecryptionError):
        jwe_decrypt(".".join(parts), k)


_VALUES = st.one_of(st.text(max_size=40), st.integers(), st.none(), st.binary(max_size=70).map(b64),
                    st.sampled_from(["EC", "OKP", "RSA", "oct", "P-256", "P-384", "X25519"]))


@FUZZ
@given(st.dictionaries(st.sampled_from(["kty", "crv", "x", "y", "d", "n", "e", "k"]), _VALUES, max_size=6),
       st.booleans())
def test_fuzz_jwe_hostile_epk(keys, epk, keep_body):
    """A well-formed ECDH-ES header with a hostile ephemeral key reaches the key import path."""
    k = keys["ec-p256"]
    body = jwe_encrypt(b"x", k.public_key).split(".")[1:] if keep_body else ["", "A" * 16, "AA", "A" * 22]
    head = b64(json.dumps({"alg": "ECDH-ES", "enc": "A256GCM", "epk": epk}).encode())
    with pytest.raises(MigsecError):
        jwe_decrypt(".".join([head, *body]), k)


# --- interoperability: the tokens are ordinary JOSE (checked with joserfc both ways) ----------
def _joserfc_key(key):
    from joserfc.jwk import ECKey, OKPKey, RSAKey

    cls = {"ec-p256": ECKey, "ed25519": OKPKey}.get(key.kind, RSAKey)
    return cls.import_key(key.to_pem())


@pytest.mark.parametrize("kind", ["ec-p256", "ed25519", "rsa-3072"])
def test_jws_interoperates_with_joserfc(keys, kind):
    from joserfc import jws
    from joserfc.errors import JoseError

    k = keys[kind]
    token = jws_sign(CLAIMS, k, kid="a1", typ="migsec-authr+jwt")
    obj = jws.deserialize_compact(token, _joserfc_key(k.public_key), algorithms=[k.jose_alg])
    assert json.loads(obj.payload) == CLAIMS and obj.headers()["typ"] == "migsec-authr+jwt"
    h, p, s = token.split(".")
    with pytest.raises(JoseError):  # joserfc also sees a changed payload as a bad signature
        jws.deserialize_compact(f"{h}.{b64(b'{}')}.{s}", _joserfc_key(k.public_key), algorithms=[k.jose_alg])
    theirs = jws.serialize_compact({"alg": k.jose_alg, "kid": "x"}, json.dumps(CLAIMS).encode(),
                                   _joserfc_key(k), algorithms=[k.jose_alg])
    assert jws_verify(theirs, k.public_key) == CLAIMS


def test_jws_verify_refuses_non_ascii_and_bad_header_types(keys):
    k = keys["ec-p256"]
    h, p, s = jws_sign(CLAIMS, k).split(".")
    with pytest.raises(MalformedMessageError):
        jws_verify(f"{h}.{p}\u00e9.{s}", k.public_key)
    head = b64(json.dumps({"alg": "ES256", "typ": 7}).encode())
    with pytest.raises(MalformedMessageError, match="strings"):
        jws_verify(f"{head}.{p}.{s}", k.public_key)


def test_ec_jwe_interoperates_with_joserfc(keys):
    from joserfc import jwe

    k = keys["ec-p256"]
    token = jwe_encrypt(b"MigReq body", k.public_key, kid="b1")
    assert token.split(".")[1] == ""  # direct key agreement: no wrapped key
    obj = jwe.decrypt_compact(token, _joserfc_key(k), algorithms=["ECDH-ES", "A256GCM"])
    assert obj.plaintext == b"MigReq body" and obj.headers()["kid"] == "b1"
    theirs = jwe.encrypt_compact({"alg": "ECDH-ES", "enc": "A256GCM"}, b"from joserfc",
                                 _joserfc_key(k.public_key), algorithms=["ECDH-ES", "A256GCM"])
    assert jwe_decrypt(theirs, k) == b"from joserfc"
    # the algorithm is pinned: a key-wrapped token to the same key is refused
    wrapped = jwe.encrypt_compact({"alg": "ECDH-ES+A256KW", "enc": "A256GCM"}, b"x",
                                  _joserfc_key(k.public_key), algorithms=["ECDH-ES+A256KW", "A256GCM"])
    with pytest.raises(DecryptionError):
        jwe_decrypt(wrapped, k)


def test_ec_jwe_refuses_off_curve_and_wrong_sized_parts(keys):
    k = keys["ec-p256"]
    parts = jwe_encrypt(b"x", k.public_key).split(".")
    header = jwe_header(".".join(parts))
    x = base64.urlsafe_b64decode(header["epk"]["x"] + "=")
    off_curve = {**header["epk"], "x": b64(bytes([x[0] ^ 1]) + x[1:])}
    for bad in ({**header, "epk": off_curve}, {**header, "epk": {**header["epk"], "crv": "P-384"}},
                {**header, "epk": {**header["epk"], "d": header["epk"]["x"]}}):
        with pytest.raises(DecryptionError):
            jwe_decrypt(".".join([b64(json.dumps(bad).encode()), *parts[1:]]), k)
    for i, value in ((1, "AAAA"), (2, "AAAA"), (4, "AAAA")):  # wrapped key, short iv, short tag
        with pytest.raises(DecryptionError):
            jwe_decrypt(".".join(parts[:i] + [value] + parts[i + 1:]), k)
    assert jwe_decrypt(".".join(parts), k) == b"x"


def test_header_kid_and_typ_must_be_strings(keys):
    k = keys["ec-p256"]
    with pytest.raises(CryptoError, match="strings"):
        jws_sign(CLAIMS, k, kid=5)
    with pytest.raises(CryptoError, match="string"):
        jwe_encrypt(b"x", k.public_key, kid=b"b1")
    token = jwe_encrypt(b"x", k.public_key, kid='b"1\u00e9')  # escaped like any JSON string
    assert jwe_header(token)["kid"] == 'b"1\u00e9' and jwe_decrypt(token, k) == b"x"


class _WrongTyp(MigsecError):
    pass


def test_jws_typ_check_sees_typ_before_the_signature(keys):
    k = keys["ec-p256"]
    seen: list[str | None] = []

    def want(expected):
        def check(typ):
            seen.append(typ)
            if typ != expected:
                raise _WrongTyp(typ)
        return check

    token = jws_sign(CLAIMS, k, typ="migsec-a+jwt")
    assert jws_verify(token, k.public_key, typ_check=want("migsec-a+jwt")) == CLAIMS
    # a token from another key: the typ refusal comes first, the signature is never reached
    foreign = jws_sign(CLAIMS, SigningKey.generate("ec-p256"), typ="migsec-b+jwt")
    with pytest.raises(_WrongTyp):
        jws_verify(foreign, k.public_key, typ_check=want("migsec-a+jwt"))
    # a passing typ check does not excuse a bad signature
    with pytest.raises(SignatureError):
        jws_verify(foreign, k.public_key, typ_check=want("migsec-b+jwt"))
    assert jws_verify(jws_sign(CLAIMS, k), k.public_key, typ_check=lambda t: seen.append(t)) == CLAIMS
    assert seen == ["migsec-a+jwt", "migsec-b+jwt", "migsec-b+jwt", None]

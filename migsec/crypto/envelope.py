"""JOSE envelopes (compact serialization) for tickets and control messages.

Signed claims are JWS; confidential bodies are JWE, either to a certificate's
public key (EC P-256: ECDH-ES, RSA: RSA-OAEP-256; content A256GCM) or
under a shared symmetric key (``dir`` + A256GCM, for E_SK1 / E_SK2 / E_SK3).
Each call accepts exactly one algorithm, fixed by the key, so a token cannot
choose a weaker one (no ``none``, no HMAC-with-public-key confusion, no ``zip``).

JWS and the EC JWE are assembled here from ``cryptography`` primitives (they are on the
handshake's hot path, where joserfc's generic machinery cost more than the public-key
operations); RSA and ``dir`` JWEs go through joserfc. Tests check both directions of
interoperability with joserfc, so the tokens stay ordinary JOSE.
"""
from __future__ import annotations

import binascii
import json
import logging
import re
import struct
from typing import Any, Callable

from joserfc import jwe, jws
from joserfc.errors import JoseError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from joserfc.jwk import ECKey, OctKey, RSAKey, OKPKey

from migsec.crypto.aead import Aead
from migsec.crypto.kdf import random_bytes
from migsec.crypto.keys import SigningKey, VerifyingKey
from migsec.canonical import no_constant, no_duplicates
from migsec.errors import CryptoError, DecryptionError, MalformedMessageError, MigsecError, SignatureError

log = logging.getLogger(__name__)

# Control messages are small; refuse anything bigger before parsing it.
MAX_TOKEN_SIZE = 1 << 20
ENC = "A256GCM"
DIR_KEY_SIZE = 32
# Header members migsec writes. Anything else (crit, b64, jku, x5u, jwk, zip, ...) would change
# how a library processes the token, so it is refused before the library sees it.
JWS_HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})
JWE_HEADER_MEMBERS = frozenset({"alg", "enc", "kid", "epk"})
_LIBRARY_ERRORS = (JoseError, ValueError, TypeError, KeyError, AttributeError, IndexError)


# --- strict JSON and base64url (used for JWS claims and unverified peeking) ---------------
# One decoder for every call: json.loads with hooks builds a new JSONDecoder each time.
_DECODER = json.JSONDecoder(object_pairs_hook=no_duplicates, parse_constant=no_constant)


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = _DECODER.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedMessageError(f"{what} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise MalformedMessageError(f"{what} must be a JSON object")
    return value


_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_TO_URL = bytes.maketrans(b"+/", b"-_")
_FROM_URL = bytes.maketrans(b"-_", b"+/")


def _b64url_decode(part: str, what: str) -> bytes:
    if not isinstance(part, str) or _B64URL.fullmatch(part) is None or len(part) % 4 == 1:
        raise MalformedMessageError(f"{what} is not base64url")
    try:
        # binascii directly: base64.urlsafe_b64decode wraps it in type checks that cost more
        # than the decoding on these short parts; the pattern above admits only ASCII
        return binascii.a2b_base64(part.encode("ascii").translate(_FROM_URL) + b"=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise MalformedMessageError(f"{what} is not base64url") from exc


def _split(token: str | bytes, parts: int, kind: str) -> list[str]:
    if isinstance(token, (bytes, bytearray)):
        try:
            token = bytes(token).decode("ascii")
        except UnicodeDecodeError as exc:
            raise MalformedMessageError(f"{kind} token is not ASCII") from exc
    if not isinstance(token, str):
        raise MalformedMessageError(f"{kind} token must be str or bytes")
    if len(token) > MAX_TOKEN_SIZE:
        raise MalformedMessageError(f"{kind} token larger than {MAX_TOKEN_SIZE} bytes")
    pieces = token.split(".")
    if len(pieces) != parts:
        raise MalformedMessageError(f"{kind} compact token must have {parts} parts, got {len(pieces)}")
    return pieces


# Built once (json.dumps with arguments builds one per call); ASCII-escaped, sorted, compact.
_CLAIMS_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


def _claims_bytes(claims: dict[str, Any]) -> bytes:
    if not isinstance(claims, dict):
        raise CryptoError("JWS claims must be a dict")
    try:
        return _CLAIMS_ENCODER.encode(claims).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CryptoError(f"JWS claims are not JSON-serializable: {exc}") from exc


def _import_jwk(key: SigningKey | VerifyingKey):
    if key.kind == "ec-p256":
        return ECKey.import_key(key._key)  # type: ignore[arg-type]
    if key.kind == "ed25519":
        return OKPKey.import_key(key._key)  # type: ignore[arg-type]
    return RSAKey.import_key(key._key)  # type: ignore[arg-type]


def _jwk(key: SigningKey | VerifyingKey):
    # Built once per key object and kept on it: importing a key (and joserfc's JWK dict,
    # derived lazily and cached on its key object) cost more than the signature itself.
    # The object holds only the same key material; nothing about a token is cached.
    jwk = key._jose
    if jwk is None:
        jwk = key._jose = _import_jwk(key)
    return jwk


# --- JWS ------------------------------------------------------------------------------------
# A compact JWS is BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature) over the
# ASCII of the first two parts (RFC 7515 §7.1). SigningKey.sign already yields the JOSE form of
# the signature for each kind (ES256 raw r||s, Ed25519, PS256 with a 32-byte salt), so the token
# is assembled here rather than by joserfc, whose per-call key and header machinery cost more
# than the signature itself. Tests check interoperability with joserfc both ways.
def _b64url(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URL).rstrip(b"=").decode("ascii")


def jws_sign(claims: dict[str, Any], key: SigningKey, *, kid: str | None = None, typ: str | None = None) -> str:
    """Sign ``claims`` (a JSON object) as a compact JWS with the key's algorithm."""
    if any(v is not None and not isinstance(v, str) for v in (kid, typ)):
        raise CryptoError("JWS kid and typ must be strings")
    header: dict[str, Any] = {"alg": key.jose_alg}
    if kid is not None:
        header["kid"] = kid
    if typ is not None:
        header["typ"] = typ
    signing_input = _b64url(_claims_bytes(header)) + "." + _b64url(_claims_bytes(claims))
    return signing_input + "." + _b64url(key.sign(signing_input.encode("ascii")))


def jws_peek(token: str | bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims WITHOUT verifying the signature: for routing (kid, iss) only."""
    header_b64, payload_b64, _sig = _split(token, 3, "JWS")
    header = _json_object(_b64url_decode(header_b64, "JWS header"), "JWS header")
    claims = _json_object(_b64url_decode(payload_b64, "JWS payload"), "JWS payload")
    return header, claims


def jws_verify(token: str | bytes, key: VerifyingKey, *,
               typ_check: Callable[[str | None], None] | None = None) -> dict[str, Any]:
    """Verify a compact JWS made by ``key`` and return its claims.

    Garbage raises MalformedMessageError; a wrong algorithm or a bad signature
    raises SignatureError. ``typ_check(typ)``, if given, sees the header's ``typ`` (None when
    absent) before the signature is checked and raises to refuse the token: it lets a caller
    tell a reflected message from a forged one without parsing the header a second time.
    """
    header_b64, payload_b64, sig_b64 = _split(token, 3, "JWS")
    header = _json_object(_b64url_decode(header_b64, "JWS header"), "JWS header")
    extra = set(header) - JWS_HEADER_MEMBERS
    if extra:
        raise MalformedMessageError(f"JWS header has unsupported members {sorted(extra)}")
    if any(not isinstance(header[m], str) for m in ("kid", "typ") if m in header):
        raise MalformedMessageError("JWS header kid and typ must be strings")
    if typ_check is not None:
        typ_check(header.get("typ"))
    if header.get("alg") != key.jose_alg:
        raise SignatureError(f"JWS algorithm {header.get('alg')!r} does not match the key ({key.jose_alg})")
    payload = _b64url_decode(payload_b64, "JWS payload")  # also proves both parts are ASCII
    signature = _b64url_decode(sig_b64, "JWS signature")
    # Signature first: the claims of an unverified token are not even parsed.
    key.verify(signature, (header_b64 + "." + payload_b64).encode("ascii"))
    return _json_object(payload, "JWS payload")


# --- JWE to a public key ----------------------------------------------------------------------
EC_JWE_ALG = "ECDH-ES"
_P256 = ec.SECP256R1()
_ECDH = ec.ECDH()
_P256_COORD = 32
_GCM_IV, _GCM_TAG = 12, 16
# RFC 7518 §4.6.2 Concat KDF OtherInfo for ECDH-ES in direct mode: AlgorithmID is the "enc"
# value, PartyUInfo and PartyVInfo are empty, SuppPubInfo is the key length in bits.
_CONCAT_OTHERINFO = (struct.pack(">I", len(ENC)) + ENC.encode("ascii") + struct.pack(">II", 0, 0)
                     + struct.pack(">I", 256))


def _jwe_alg(kind: str) -> str:
    if kind == "ec-p256":
        return EC_JWE_ALG
    if kind.startswith("rsa-"):
        return "RSA-OAEP-256"
    raise CryptoError(f"a {kind} key cannot receive encrypted messages; use an ec-p256 or RSA key")


def _ecdh_es_cek(shared: bytes) -> bytes:
    return ConcatKDFHash(hashes.SHA256(), 32, _CONCAT_OTHERINFO).derive(shared)


def jwe_header(token: str | bytes) -> dict[str, Any]:
    """The protected header of a compact JWE, unverified (for routing by kid only)."""
    header_b64 = _split(token, 5, "JWE")[0]
    return _json_object(_b64url_decode(header_b64, "JWE header"), "JWE header")


# EC recipients use ECDH-ES in direct key agreement mode (RFC 7518 §4.6): the Concat KDF output
# is the A256GCM key, so there is no wrapped key. Built here from cryptography primitives, as the
# JWS above, because joserfc's generic path cost more than the ECDH itself; the tests check that
# joserfc decrypts these tokens and that its tokens decrypt here.
def _ecdh_es_encrypt(plaintext: bytes, recipient: VerifyingKey, kid: str | None) -> str:
    ephemeral = ec.generate_private_key(_P256)
    point = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    # The same bytes _claims_bytes would give (sorted members, no spaces), without json.dumps:
    # x and y are base64url, so nothing needs escaping; a kid still goes through json.
    if kid is not None and not isinstance(kid, str):
        raise CryptoError("JWE kid must be a string")
    kid_member = "" if kid is None else ',"kid":' + json.dumps(kid)
    header_b64 = _b64url(
        f'{{"alg":"{EC_JWE_ALG}","enc":"{ENC}","epk":{{"crv":"P-256","kty":"EC","x":"{_b64url(point[1:33])}",'
        f'"y":"{_b64url(point[33:])}"}}{kid_member}}}'.encode("ascii"))
    cek = _ecdh_es_cek(ephemeral.exchange(_ECDH, recipient._key))  # type: ignore[arg-type]
    iv = random_bytes(_GCM_IV)
    sealed = Aead("aes-256-gcm", cek).seal(iv, bytes(plaintext), header_b64.encode("ascii"))
    return ".".join((header_b64, "", _b64url(iv), _b64url(sealed[:-_GCM_TAG]), _b64url(sealed[-_GCM_TAG:])))


def _coordinate(epk: dict[str, Any], name: str) -> bytes:
    value = epk.get(name)
    if not isinstance(value, str):
        raise MalformedMessageError(f"JWE epk {name} missing")
    raw = _b64url_decode(value, f"JWE epk {name}")
    if len(raw) != _P256_COORD:
        raise MalformedMessageError(f"JWE epk {name} must be {_P256_COORD} bytes")
    return raw


def _ecdh_es_decrypt(token: str | bytes, key: SigningKey) -> bytes:
    header_b64, encrypted_key, iv_b64, ct_b64, tag_b64 = _split(token, 5, "JWE")
    header = _json_object(_b64url_decode(header_b64, "JWE header"), "JWE header")
    if header.get("alg") != EC_JWE_ALG or header.get("enc") != ENC or set(header) - JWE_HEADER_MEMBERS:
        raise MalformedMessageError("JWE header is not ECDH-ES/A256GCM with known members")
    if encrypted_key:
        raise MalformedMessageError("ECDH-ES (direct) carries no encrypted key")
    epk = header.get("epk")
    if not isinstance(epk, dict) or set(epk) != {"kty", "crv", "x", "y"} or (epk["kty"], epk["crv"]) != ("EC", "P-256"):
        raise MalformedMessageError("JWE epk must be an EC P-256 public key (kty, crv, x, y)")
    # from_encoded_point refuses a point that is not on P-256 (invalid-curve attacks).
    peer = ec.EllipticCurvePublicKey.from_encoded_point(_P256, b"\x04" + _coordinate(epk, "x") + _coordinate(epk, "y"))
    iv, tag = _b64url_decode(iv_b64, "JWE iv"), _b64url_decode(tag_b64, "JWE tag")
    ciphertext = _b64url_decode(ct_b64, "JWE ciphertext") if ct_b64 else b""
    if len(iv) != _GCM_IV or len(tag) != _GCM_TAG:
        raise MalformedMessageError("JWE iv or tag has the wrong size")
    cek = _ecdh_es_cek(key._key.exchange(_ECDH, peer))  # type: ignore[union-attr]
    return Aead("aes-256-gcm", cek).open(iv, ciphertext + tag, header_b64.encode("ascii"))


def jwe_encrypt(plaintext: bytes, recipient: VerifyingKey, *, kid: str | None = None) -> str:
    """Encrypt ``plaintext`` to ``recipient`` (EC: ECDH-ES, RSA: RSA-OAEP-256; A256GCM)."""
    alg = _jwe_alg(recipient.kind)
    if not isinstance(plaintext, (bytes, bytearray)):
        raise CryptoError("JWE plaintext must be bytes")
    if alg == EC_JWE_ALG:
        return _ecdh_es_encrypt(plaintext, recipient, kid)
    header: dict[str, Any] = {"alg": alg, "enc": ENC}
    if kid is not None:
        header["kid"] = kid
    try:
        return jwe.encrypt_compact(header, bytes(plaintext), _jwk(recipient), algorithms=[alg, ENC])
    except JoseError as exc:
        raise CryptoError(f"JWE encryption failed: {exc}") from exc


def _decrypt(token: str | bytes, jwk: Any, alg: str) -> bytes:
    # Every failure is the same opaque error; the reason goes to the local debug log only.
    try:
        header = jwe_header(token)
        if header.get("alg") != alg or header.get("enc") != ENC or set(header) - JWE_HEADER_MEMBERS:
            raise DecryptionError("decryption failed")
        obj = jwe.decrypt_compact(token, jwk, algorithms=[alg, ENC])
        plaintext = obj.plaintext
        if plaintext is None:
            raise DecryptionError("decryption failed")
        return plaintext
    except DecryptionError:
        raise
    except (MalformedMessageError, *_LIBRARY_ERRORS) as exc:
        log.debug("JWE rejected: %s", type(exc).__name__)
        raise DecryptionError("decryption failed") from exc


def jwe_decrypt(token: str | bytes, key: SigningKey) -> bytes:
    """Decrypt a JWE addressed to ``key``; any failure raises the opaque DecryptionError."""
    alg = _jwe_alg(key.kind)
    if alg != EC_JWE_ALG:
        return _decrypt(token, _jwk(key), alg)
    try:
        return _ecdh_es_decrypt(token, key)
    except DecryptionError:
        raise
    except (MigsecError, ValueError, TypeError) as exc:
        log.debug("JWE rejected: %s", type(exc).__name__)
        raise DecryptionError("decryption failed") from exc


# --- JWE under a shared key (dir + A256GCM) ---------------------------------------------------
def _oct(key: bytes) -> OctKey:
    if not isinstance(key, (bytes, bytearray)) or len(key) != DIR_KEY_SIZE:
        raise CryptoError(f"a dir/A256GCM key must be {DIR_KEY_SIZE} bytes")
    return OctKey.import_key(bytes(key))


def jwe_encrypt_dir(plaintext: bytes, key: bytes, *, kid: str | None = None) -> str:
    """Encrypt under a 32-byte shared key (E_SK1 / E_SK2 / E_SK3)."""
    header: dict[str, Any] = {"alg": "dir", "enc": ENC}
    if kid is not None:
        header["kid"] = kid
    try:
        return jwe.encrypt_compact(header, bytes(plaintext), _oct(key), algorithms=["dir", ENC])
    except JoseError as exc:
        raise CryptoError(f"JWE encryption failed: {exc}") from exc


def jwe_decrypt_dir(token: str | bytes, key: bytes) -> bytes:
    """Decrypt a dir/A256GCM JWE; any failure raises the opaque DecryptionError."""
    return _decrypt(token, _oct(key), "dir")

"""The peer directory: which domains we migrate to, where they listen, how we know them.

A peer is known either by its certificate (checked against the trust store) or,
before first contact, by a pinned SHA-256 fingerprint of its certificate; after
a first contact whose certificate matched the pin, :meth:`PeerDirectory.pin`
stores the certificate. The file is JSON, replaced atomically under a lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from migsec.crypto.certs import certificate_fingerprint
from migsec.errors import CertificateError, ConfigError, DidMismatchError
from migsec.pki._files import read_bytes, write_atomic
from migsec.pki.ca import load_certificate
from migsec.pki.names import did_from_certificate, validate_did

DEFAULT_PORT = 7443
_FP_RE = re.compile(r"SHA256:([0-9a-f]{64})")


class UnknownPeerError(ConfigError):
    """No peer with that domain id in the directory."""


class PinMismatchError(CertificateError):
    """A peer's certificate does not match the fingerprint pinned for it."""

    exit_code = 3


@dataclass(frozen=True)
class Peer:
    did: str
    address: str  # migsec://host:port
    cert_pem: bytes | None = None
    fingerprint: str | None = None  # SHA256:<hex> of the certificate DER


def normalize_fingerprint(fp: str) -> str:
    """Accept ``SHA256:<hex>`` with any case and optional colons; return ``SHA256:<lower hex>``."""
    if not isinstance(fp, str) or not fp.upper().startswith("SHA256:"):
        raise ConfigError(f"fingerprint {fp!r} must look like SHA256:<64 hex digits>")
    norm = "SHA256:" + fp[7:].replace(":", "").lower()
    if not _FP_RE.fullmatch(norm):
        raise ConfigError(f"fingerprint {fp!r} must look like SHA256:<64 hex digits>")
    return norm


def normalize_address(address: str) -> str:
    """``host[:port]`` or ``migsec://host[:port]`` -> ``migsec://host:port``."""
    raw = address if "://" in address else f"migsec://{address}"
    try:
        parts = urlsplit(raw)
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ConfigError(f"peer address {address!r} is invalid: {exc}") from exc
    if parts.scheme != "migsec" or not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigError(f"peer address {address!r} must look like migsec://host:port")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"migsec://{host}:{port}"


class PeerDirectory:
    """Peers kept in one JSON file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot lock peer directory {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, Peer]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(read_bytes(self.path, "peer directory"))
            if data.get("version") != 1 or not isinstance(data.get("peers"), dict):
                raise ValueError("expected {\"version\": 1, \"peers\": {...}}")
            peers = {}
            for did, p in data["peers"].items():
                cert = p.get("cert_pem")
                peers[did] = Peer(validate_did(did), normalize_address(p["address"]),
                                  cert.encode("ascii") if cert else None,
                                  normalize_fingerprint(p["fingerprint"]) if p.get("fingerprint") else None)
            return peers
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeError) as exc:
            raise ConfigError(f"peer directory {self.path} is corrupt: {exc}") from exc
        except CertificateError as exc:
            raise ConfigError(f"peer directory {self.path} is corrupt: {exc}") from exc

    def _write(self, peers: dict[str, Peer]) -> None:
        out: dict[str, Any] = {"version": 1, "peers": {}}
        for did in sorted(peers):
            d = asdict(peers[did])
            del d["did"]
            d["cert_pem"] = d["cert_pem"].decode("ascii") if d["cert_pem"] else None
            out["peers"][did] = d
        write_atomic(self.path, json.dumps(out, indent=2).encode() + b"\n")

    def add(self, did: str, address: str, *, cert_pem: bytes | None = None, fingerprint: str | None = None,
            replace: bool = False) -> Peer:
        """Add a peer known by certificate and/or pinned fingerprint (at least one is needed)."""
        validate_did(did)
        address = normalize_address(address)
        if cert_pem is None and fingerprint is None:
            raise ConfigError(f"peer {did}: give its certificate or a SHA256 fingerprint to pin")
        if fingerprint is not None:
            fingerprint = normalize_fingerprint(fingerprint)
        if cert_pem is not None:
            cert = load_certificate(cert_pem, f"certificate of peer {did}")
            if did_from_certificate(cert) != did:
                raise DidMismatchError(f"certificate is for domain {did_from_certificate(cert)!r}, not {did!r}")
            actual = certificate_fingerprint(cert)
            if fingerprint is not None and fingerprint != actual:
                raise PinMismatchError(f"certificate of {did} has fingerprint {actual}, not the given {fingerprint}")
            fingerprint = actual
        peer = Peer(did, address, cert_pem, fingerprint)
        with self._locked():
            peers = self._read()
            if did in peers and not replace:
                raise ConfigError(f"peer {did} already exists in {self.path} (`migsec peer add {did} ... --replace` replaces it)")
            peers[did] = peer
            self._write(peers)
        return peer

    def get(self, did: str) -> Peer:
        peers = self._read()
        if did not in peers:
            raise UnknownPeerError(f"no peer {did!r} in {self.path} (add it with: migsec peer add)")
        return peers[did]

    def list(self) -> list[Peer]:
        return [p for _, p in sorted(self._read().items())]

    def remove(self, did: str) -> None:
        with self._locked():
            peers = self._read()
            if did not in peers:
                raise UnknownPeerError(f"no peer {did!r} in {self.path}")
            del peers[did]
            self._write(peers)

    def pin(self, did: str, cert_pem: bytes) -> Peer:
        """Store a peer's certificate after first contact; it must match the pinned fingerprint."""
        cert = load_certificate(cert_pem, f"certificate of peer {did}")
        actual = certificate_fingerprint(cert)
        with self._locked():
            peers = self._read()
            if did not in peers:
                raise UnknownPeerError(f"no peer {did!r} in {self.path}")
            peer = peers[did]
            if peer.fingerprint != actual:
                raise PinMismatchError(f"certificate of {did} has fingerprint {actual}; pinned is {peer.fingerprint}")
            if did_from_certificate(cert) != did:
                raise DidMismatchError(f"certificate is for domain {did_from_certificate(cert)!r}, not {did!r}")
            peers[did] = Peer(did, peer.address, cert_pem, actual)
            self._write(peers)
            return peers[did]

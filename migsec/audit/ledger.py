"""The append-only, hash-chained, signed audit ledger (``Ledger``).

One JSON object per line. Each entry holds ``seq`` (1, 2, ...), ``time`` (UTC,
ISO 8601), ``kind``, ``migration_id``, ``prev`` (the previous entry's hash; 64
zeros for the first), ``body`` and ``peer`` (a message signed by a peer domain,
stored verbatim as its compact JWS with the certificate PEM it was made with, or
null). ``hash`` is SHA-256 over the canonical JSON of those fields and ``sig`` is
a compact JWS by this domain's key over ``{ledger, seq, hash}``.

Which local key signed is itself in the ledger: before the first entry signed by
a key, a ``ledger-signer`` entry carries that key's certificate. So a ledger can be
checked anywhere with nothing but the CA certificates (``verify(trust_store)``):
every signer and peer certificate is chained to the trust store at the time of the
entry that used it.

Appends are one ``write`` on an ``O_APPEND`` descriptor followed by ``fsync``,
under a thread lock and an ``flock`` (several processes may share the file). A
writer finds the chain tip from the file's last line and the current signer by
searching back for it, at most ``SIGNER_WINDOW`` bytes: when the last signer entry
is further back, the writer repeats its own ``ledger-signer`` entry. So a fresh
process (the libvirt hook) adds an entry at the same cost however long the ledger.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from migsec.canonical import canonical_json as _canonical_json
from migsec.crypto.envelope import jws_peek, jws_sign, jws_verify
from migsec.errors import AuditError, LedgerCorruptError, MigsecError

GENESIS = "0" * 64
SIGNER_KIND = "ledger-signer"
SIG_TYP = "migsec-ledger+jws"
_KIND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CORE_FIELDS = ("seq", "time", "kind", "migration_id", "prev", "body", "peer")


def canonical_json(value: Any) -> bytes:
    """The byte form that is hashed: sorted keys, no spaces, ASCII, no NaN."""
    return _canonical_json(value, ascii=True)


def entry_hash(core: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json({k: core[k] for k in _CORE_FIELDS})).hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    time: str
    kind: str
    migration_id: str | None
    prev: str
    body: Mapping[str, Any]
    peer: Mapping[str, Any] | None  # {"did", "token", "cert_pem"}
    hash: str
    sig: str
    line: int = 0  # 1-based line in the file (for messages)

    @property
    def when(self) -> datetime:
        return _parse_time(self.time)

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "kind": self.kind,
                "migration_id": self.migration_id, "prev": self.prev, "body": dict(self.body),
                "peer": dict(self.peer) if self.peer is not None else None,
                "hash": self.hash, "sig": self.sig}


@dataclass(frozen=True)
class VerifyReport:
    entries: int
    last_hash: str
    signers: tuple[str, ...]  # DIDs whose certificates signed local entries
    peer_messages: int


class Ledger:
    """An audit ledger file written by ``identity`` (``.did``, ``.key``, ``.cert_pem``).

    ``identity`` may be None to read and verify only.
    """

    def __init__(self, path: str | os.PathLike[str], identity: Any = None, *,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.path = Path(path)
        self.identity = identity
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._lock = threading.Lock()
        # what we know of the file up to _offset: last seq/hash, current signer certificate
        self._offset = 0
        self._seq = 0
        self._hash = GENESIS
        self._signer_pem: str | None = None

    # --- writing
    def append(self, kind: str, migration_id: str | None = None,
               body: Mapping[str, Any] | None = None, *, peer_token: str | None = None,
               peer_cert_pem: bytes | str | None = None, peer_did: str | None = None,
               **fields: Any) -> LedgerEntry:
        """Append a signed entry; ``fields`` are merged into ``body``.

        A peer-signed message (``peer_token``, a compact JWS) must come with the certificate
        (``peer_cert_pem``) whose key signed it, so that it can be checked later.
        """
        if self.identity is None:
            raise AuditError(f"{self.path}: ledger opened read-only (no identity)")
        if not isinstance(kind, str) or not _KIND.match(kind) or kind == SIGNER_KIND:
            raise AuditError(f"ledger entry kind {kind!r} is invalid")
        if migration_id is not None and not isinstance(migration_id, str):
            raise AuditError("ledger migration_id must be a string")
        full_body = dict(body or {})
        full_body.update(fields)
        peer = None
        if peer_token is not None or peer_cert_pem is not None:
            peer = _peer_record(peer_token, peer_cert_pem, peer_did)
        elif peer_did is not None:
            raise AuditError("peer_did given without a peer_token")
        with self._locked() as fd:
            self._catch_up(fd)
            # the chain tip moves only once the lines are durably written
            lines = []
            seq, prev = self._seq, self._hash
            cert_pem = _text(self.identity.cert_pem)
            if cert_pem != self._signer_pem:
                signer = self._make(seq + 1, prev, SIGNER_KIND, None,
                                    {"did": self.identity.did, "certificate": cert_pem}, None)
                lines.append(signer)
                seq, prev = signer.seq, signer.hash
            entry = self._make(seq + 1, prev, kind, migration_id, full_body, peer)
            lines.append(entry)
            data = b"".join(canonical_json(e.as_dict()) + b"\n" for e in lines)
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(0, f"short write ({written} of {len(data)} bytes)")
                os.fsync(fd)
            except OSError as exc:
                raise AuditError(f"{self.path}: cannot append to the ledger: "
                                 f"{exc.strerror or exc}") from exc
            self._offset += len(data)
            self._seq, self._hash = entry.seq, entry.hash
            self._signer_pem = cert_pem
        return entry

    def _make(self, seq: int, prev: str, kind: str, migration_id: str | None,
              body: dict[str, Any], peer: dict[str, Any] | None) -> LedgerEntry:
        core: dict[str, Any] = {"seq": seq, "time": _format_time(self._clock()), "kind": kind,
                "migration_id": migration_id, "prev": prev, "body": body, "peer": peer}
        try:
            digest = entry_hash(core)
        except (TypeError, ValueError) as exc:
            raise AuditError(f"ledger entry {kind!r} is not plain JSON: {exc}") from exc
        sig = jws_sign({"ledger": self.identity.did, "seq": core["seq"], "hash": digest},
                       self.identity.key, kid=self.identity.did, typ=SIG_TYP)
        return LedgerEntry(hash=digest, sig=sig, **core)

    def _locked(self):
        return _Locked(self)

    def _catch_up(self, fd: int) -> None:
        """Learn what other writers appended since we last looked (chain tip, signer).

        Only the tail is read: the last line gives the tip, and a backward search finds the
        last ``ledger-signer`` entry, so an append costs the same on a long ledger (checking
        every line is ``verify``'s job).
        """
        size = os.fstat(fd).st_size
        if size == self._offset:
            return
        if size < self._offset:
            raise LedgerCorruptError(f"{self.path}: the ledger shrank from {self._offset} to "
                                     f"{size} bytes while open")
        if _pread(fd, 1, size - 1) != b"\n":
            raise LedgerCorruptError(f"{self.path}: the last line is incomplete (a crash during "
                                     "an append, or damage); refusing to extend it — run "
                                     "`migsec audit verify` and move the file aside")
        tip = _decode_line(_line_at(fd, size - 1, self._offset, size), self.path, 0)
        window = max(self._offset, size - SIGNER_WINDOW)
        signer = _last_signer(fd, self._offset, window, size, self.path)
        if signer is not None:
            self._signer_pem = signer.body.get("certificate")
        elif window > self._offset:
            # no signer in the last SIGNER_WINDOW bytes: rather than read further back,
            # declare ours again (a repeated ledger-signer entry is valid, and it keeps
            # the cost of an append bounded however long the ledger grows)
            self._signer_pem = None
        self._seq, self._hash = tip.seq, tip.hash
        self._offset = size

    # --- reading
    def entries(self, migration_id: str | None = None) -> Iterator[LedgerEntry]:
        """Entries in file order (parsed, NOT verified), optionally of one migration."""
        for entry in self._read_all():
            if migration_id is None or entry.migration_id == migration_id:
                yield entry

    def _read_all(self) -> Iterator[LedgerEntry]:
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot read the ledger: {exc.strerror}") from exc
        with fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n"):
                    raise LedgerCorruptError(f"{self.path}: line {number} is incomplete "
                                             "(truncated write or damaged file)")
                yield _decode_line(raw, self.path, number)

    def verify(self, trust_store: Any) -> VerifyReport:
        """Check the chain, every local signature and every peer signature.

        ``trust_store.verify(cert_pem, expected_did=..., at=...)`` must return an object with
        ``.did`` and ``.public_key``. Raises ``LedgerCorruptError`` naming the first bad entry.
        """
        expected_seq, prev = 1, GENESIS
        signer = None  # (did, VerifyingKey) of the current ledger-signer
        signers: list[str] = []
        peer_messages = 0
        for e in self._read_all():
            where = f"{self.path}: entry {e.seq} (line {e.line}, {e.kind})"
            if e.seq != expected_seq:
                what = ("an entry was deleted or entries were reordered" if e.seq > expected_seq
                        else "entries were reordered or duplicated")
                raise LedgerCorruptError(f"{self.path}: line {e.line}: expected entry "
                                         f"{expected_seq}, found entry {e.seq} ({what})")
            if e.prev != prev:
                raise LedgerCorruptError(f"{where}: does not chain to the entry before it "
                                         "(prev hash differs: an earlier entry was edited, "
                                         "removed or reordered)")
            if entry_hash(e.as_dict()) != e.hash:
                raise LedgerCorruptError(f"{where}: content does not match its hash (edited)")
            if e.kind == SIGNER_KIND:
                verified = self._check_cert(trust_store, e.body.get("certificate"),
                                            e.body.get("did"), e, where, "signer certificate")
                signer = (e.body.get("did"), verified.public_key, verified)
                signers.append(str(signer[0]))
            if signer is None:
                raise LedgerCorruptError(f"{where}: no ledger-signer entry precedes it")
            self._check_local_sig(e, signer, where)
            not_after = _aware(getattr(signer[2], "not_after", None))
            if not_after is not None and e.when > not_after:
                raise LedgerCorruptError(f"{where}: signed after the signer certificate of "
                                         f"{signer[0]} expired ({not_after.isoformat()})")
            if e.peer is not None:
                self._check_peer(trust_store, e, where)
                peer_messages += 1
            expected_seq, prev = e.seq + 1, e.hash
        return VerifyReport(entries=expected_seq - 1, last_hash=prev, signers=tuple(signers),
                            peer_messages=peer_messages)

    def _check_cert(self, trust_store: Any, cert_pem: Any, did: Any, e: LedgerEntry,
                    where: str, what: str) -> Any:
        if not isinstance(cert_pem, str):
            raise LedgerCorruptError(f"{where}: {what} is missing")
        try:
            verified = trust_store.verify(cert_pem.encode("ascii"), expected_did=did, at=e.when)
        except MigsecError as exc:
            raise LedgerCorruptError(f"{where}: {what} is not trusted at {e.time}: {exc}") from exc
        return verified

    def _check_local_sig(self, e: LedgerEntry, signer: tuple[Any, Any, Any], where: str) -> None:
        did, key, _ = signer
        try:
            claims = jws_verify(e.sig, key)
        except MigsecError as exc:
            raise LedgerCorruptError(f"{where}: local signature by {did} does not verify "
                                     f"({exc})") from exc
        if claims != {"ledger": did, "seq": e.seq, "hash": e.hash}:
            raise LedgerCorruptError(f"{where}: local signature covers another entry "
                                     f"(seq {claims.get('seq')}, hash {claims.get('hash')})")

    def _check_peer(self, trust_store: Any, e: LedgerEntry, where: str) -> None:
        peer = e.peer or {}
        did = peer.get("did")
        key = self._check_cert(trust_store, peer.get("cert_pem"), did, e, where,
                               f"peer certificate{' of ' + did if did else ''}").public_key
        try:
            jws_verify(peer.get("token", ""), key)
        except MigsecError as exc:
            raise LedgerCorruptError(f"{where}: peer signature{' of ' + did if did else ''} "
                                     "does not verify with the certificate stored with it "
                                     f"({exc})") from exc


class _Locked:
    """Thread lock + exclusive flock on the ledger file, yielding its O_APPEND descriptor."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.fd = -1

    def __enter__(self) -> int:
        self.ledger._lock.acquire()
        try:
            self.ledger.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.ledger.path,
                              os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            if self.fd >= 0:
                os.close(self.fd)
            self.ledger._lock.release()
            raise AuditError(f"{self.ledger.path}: cannot open the ledger: {exc.strerror}") from exc
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
        self.ledger._lock.release()


def _peer_record(token: str | None, cert_pem: bytes | str | None, did: str | None) -> dict[str, Any]:
    if token is None or cert_pem is None:
        raise AuditError("a peer-signed message needs both peer_token and peer_cert_pem")
    if isinstance(token, bytes):
        token = token.decode("ascii")
    try:
        jws_peek(token)  # stored verbatim, but it must at least be a JWS
    except MigsecError as exc:
        raise AuditError(f"peer_token is not a compact JWS: {exc}") from exc
    pem = _text(cert_pem)
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise AuditError("peer_cert_pem is not a PEM certificate")
    return {"did": did, "token": token, "cert_pem": pem}


_LINE_CHUNK = 8 * 1024  # most lines are shorter: finding a line's ends reads one or two
SIGNER_WINDOW = 4 << 20  # how far back a fresh writer looks for the current ledger-signer
_SCAN_CHUNK = 1 << 20
_SIGNER_MARK = f'"{SIGNER_KIND}"'.encode("ascii")


def _pread(fd: int, n: int, offset: int) -> bytes:
    out = os.pread(fd, n, offset)
    while len(out) < n:  # short reads are rare on a regular file, but allowed
        part = os.pread(fd, n - len(out), offset + len(out))
        if not part:
            break
        out += part
    return out


def _line_at(fd: int, pos: int, lo: int, hi: int) -> bytes:
    """The whole line (with its newline) holding byte ``pos``; lines start at or after ``lo``."""
    start = pos
    while start > lo:  # back to the newline before pos
        begin = max(lo, start - _LINE_CHUNK)
        cut = _pread(fd, start - begin, begin).rfind(b"\n")
        if cut >= 0:
            start = begin + cut + 1
            break
        start = begin
    end = pos
    while end < hi:  # forward to the newline ending the line
        block = _pread(fd, min(_LINE_CHUNK, hi - end), end)
        cut = block.find(b"\n")
        if cut >= 0:
            end += cut + 1
            break
        end += len(block)
    return _pread(fd, end - start, start)


def _last_signer(fd: int, floor: int, lo: int, hi: int, path: Path) -> LedgerEntry | None:
    """The last ``ledger-signer`` entry found in bytes [lo, hi); lines start at or after
    ``floor`` (<= lo), so a line that begins before ``lo`` is still read whole."""
    overlap = len(_SIGNER_MARK) - 1
    top = hi
    while top > lo:
        begin = max(lo, top - _SCAN_CHUNK)
        block = _pread(fd, min(hi, top + overlap) - begin, begin)
        found = block.rfind(_SIGNER_MARK)
        if found < 0:
            top = begin
            continue
        # a body may hold the string too: only the entry's own kind counts
        line = _line_at(fd, begin + found, floor, hi)
        entry = _decode_line(line, path, 0)
        if entry.kind == SIGNER_KIND:
            return entry
        top = begin + found  # search before this hit (its line may hold another)
    return None


def _decode_line(raw: bytes, path: Path, number: int) -> LedgerEntry:
    where = f"{path}: line {number}" if number else f"{path}: an appended line"
    try:
        doc = json.loads(raw)
        entry = LedgerEntry(
            seq=doc["seq"], time=doc["time"], kind=doc["kind"], migration_id=doc["migration_id"],
            prev=doc["prev"], body=doc["body"], peer=doc["peer"], hash=doc["hash"],
            sig=doc["sig"], line=number)
        if set(doc) != set(_CORE_FIELDS) | {"hash", "sig"}:
            raise ValueError(f"unexpected fields {sorted(set(doc) ^ (set(_CORE_FIELDS) | {'hash', 'sig'}))}")
        if not isinstance(entry.seq, int) or isinstance(entry.seq, bool) or \
                not isinstance(entry.body, dict) or not isinstance(entry.sig, str) or \
                not (entry.peer is None or isinstance(entry.peer, dict)):
            raise ValueError("a field has the wrong type")
        _parse_time(entry.time)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise LedgerCorruptError(f"{where}: not a valid ledger entry ({exc})") from exc
    return entry


def _format_time(when: datetime) -> str:
    if when.tzinfo is None:
        raise AuditError("ledger clock must return an aware datetime")
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: Any) -> datetime:
    if not isinstance(text, str) or not text.endswith("Z"):
        raise ValueError(f"time {text!r} is not UTC ISO 8601")
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=timezone.utc)


def _aware(when: datetime | None) -> datetime | None:
    if when is not None and when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when


def _text(pem: bytes | str) -> str:
    return pem.decode("ascii") if isinstance(pem, bytes) else pem

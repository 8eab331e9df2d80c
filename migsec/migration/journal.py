"""The durable migration journal: one JSON file per migration under ``<state_dir>/journal/``.

``migsec recover`` rebuilds what to do after a crash from this journal alone, so
every write is write-temp + fsync + rename + fsync(dir): a crash at any instant
leaves either the previous complete state or the new one, never a mix.

Phases, in order (a migration may skip forward, may re-enter its current phase to
record progress such as acknowledged offsets, and never moves back):

source (coordinator of the two-phase commit)
  requested         the client's request arrived; nothing has happened to the VM
  authorized        local PDP permitted it, Authr_Tkt issued
  handshaken        the peer accepted (MigResp verified), traffic keys exist
  suspended         the VM is paused at the source
  streaming         data is flowing (re-entered with progress fields / after a resume); the
                    memory is saved meanwhile, and streamed as libvirt writes it
  streamed          every stream acknowledged by the destination
  saved             libvirt's save succeeded and the image re-read matches what was streamed
  receipt-received  the destination's signed receipt (restored paused there) is held
  committed         THE DECISION: from here the VM belongs to the destination
  released          the source copy is destroyed/undefined
  done              the destination confirmed it resumed the VM
  aborted           decision to abort (only before committed); the VM must run at the source
  rolled-back       the VM runs again at the source
destination
  accepted          MigReq verified and permitted, capacity reserved
  receiving         data is being written to staging (re-entered with progress)
  received          every stream written and its SHA-256 verified (with the name the VM will be
                    restored under, journaled before the restore runs)
  restored-paused   the VM is restored paused; receipt signed and sent
  commit-received   the source's commit decision is held: the VM must run here
  resumed           the VM runs here
  done              cleanup finished
  discarded         partial files and any paused VM removed (only before commit-received)

Recovery rule this encodes: before ``committed`` (source) / ``commit-received``
(destination) the source copy wins; after it the destination copy wins.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from migsec.errors import JournalError
from migsec.fsutil import atomic_write, fsync_dir
from migsec.protocol.plan import MigrationPlan

SOURCE_PHASES = ("requested", "authorized", "handshaken", "suspended", "streaming", "streamed",
                 "saved", "receipt-received", "committed", "released", "done")
SOURCE_ABORT_PHASES = ("aborted", "rolled-back")
DESTINATION_PHASES = ("accepted", "receiving", "received", "restored-paused", "commit-received",
                      "resumed", "done")
DESTINATION_ABORT_PHASES = ("discarded",)

ROLES = ("source", "destination")
TERMINAL = {"source": frozenset({"done", "rolled-back"}),
            "destination": frozenset({"done", "discarded"})}
# the durable decision point of the two-phase commit, per role
DECISION = {"source": "committed", "destination": "commit-received"}
_FORWARD = {"source": SOURCE_PHASES, "destination": DESTINATION_PHASES}
_ABORT = {"source": SOURCE_ABORT_PHASES, "destination": DESTINATION_ABORT_PHASES}
_MIGRATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_RESERVED_FIELDS = {"migration_id", "role", "phase", "history", "created", "updated"}


@dataclass(frozen=True)
class JournalEntry:
    """One migration's journalled state (read-only view)."""

    migration_id: str
    role: str
    phase: str
    data: Mapping[str, Any]  # the creation record merged with every advance()'s fields
    history: tuple[tuple[str, float], ...]  # (phase, unix time), oldest first
    created: float
    updated: float

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL[self.role]

    @property
    def decided(self) -> bool:
        """True once the commit decision is durable on this side (the destination copy wins)."""
        return any(p == DECISION[self.role] for p, _ in self.history)

    def plan(self) -> MigrationPlan:
        """The signed request's migration plan, as recorded when A authorized the migration or B
        accepted it (``plan`` field); JournalError when the entry records none."""
        raw = self.data.get("plan")
        if raw is None:
            raise JournalError(f"migration {self.migration_id}: its journal entry records no migration plan "
                               f"(written by a migsec older than Mig_Rqst version 2?): finish it by hand")
        return MigrationPlan.from_dict(raw)


def allowed_next(role: str, history: tuple[str, ...]) -> tuple[str, ...]:
    """The phases a migration of ``role`` that went through ``history`` may enter next."""
    current = history[-1]
    if current in TERMINAL[role]:
        return ()
    decided = DECISION[role] in history
    if current in _ABORT[role]:
        return ("aborted", "rolled-back") if current == "aborted" else ()
    forward = _FORWARD[role]
    after = forward[forward.index(current):]
    if not decided:
        # "done" means the move happened: it needs the decision first
        after = tuple(p for p in after if forward.index(p) <= forward.index(DECISION[role]))
        return after + _ABORT[role]
    return after


class Journal:
    """Durable per-migration state under ``<state_dir>/journal/``."""

    def __init__(self, state_dir: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(state_dir) / "journal"
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise JournalError(f"{self.dir}: cannot create the journal directory: "
                               f"{exc.strerror}") from exc
        self._remove_stale_temp_files()

    # --- writes
    def create(self, migration_id: str, role: str = "source",
               record: Mapping[str, Any] | None = None) -> JournalEntry:
        """Start journalling a migration in its first phase; ``JournalError`` if it exists."""
        _check_id(migration_id)
        if role not in ROLES:
            raise JournalError(f"journal role must be 'source' or 'destination', not {role!r}")
        record = dict(record or {})
        _check_fields(record)
        now = self._clock()
        doc = {"migration_id": migration_id, "role": role, "phase": _FORWARD[role][0],
               "created": now, "updated": now, "history": [[_FORWARD[role][0], now]],
               "data": record}
        with self._locked():
            if self._file(migration_id).exists():
                raise JournalError(f"migration {migration_id} is already in the journal")
            self._write(migration_id, doc)
        return _entry(doc)

    def advance(self, migration_id: str, phase: str, /, **fields: Any) -> JournalEntry:
        """Move a migration to ``phase`` (or re-enter it), merging ``fields`` into its data."""
        _check_fields(fields)
        with self._locked():
            doc = self._read(migration_id)
            role = doc["role"]
            history = tuple(p for p, _ in doc["history"])
            if phase not in allowed_next(role, history):
                legal = ", ".join(allowed_next(role, history)) or "none: it is finished"
                raise JournalError(f"migration {migration_id} ({role}) cannot go from "
                                   f"{history[-1]!r} to {phase!r} (allowed: {legal})")
            now = self._clock()
            doc["data"].update(fields)
            doc["phase"] = phase
            doc["updated"] = now
            if phase != history[-1]:
                doc["history"].append([phase, now])
            self._write(migration_id, doc)
        return _entry(doc)

    # --- reads
    def get(self, migration_id: str) -> JournalEntry:
        """The migration's last durable state; ``JournalError`` if unknown or unreadable."""
        _check_id(migration_id)
        return _entry(self._read(migration_id))

    def list(self, active_only: bool = False) -> list[JournalEntry]:
        """Every journalled migration (oldest first); only unfinished ones if ``active_only``."""
        entries = []
        for path in self.dir.glob("*.json"):
            entry = _entry(self._read(path.stem))
            if not (active_only and entry.terminal):
                entries.append(entry)
        return sorted(entries, key=lambda e: (e.created, e.migration_id))

    def remove(self, migration_id: str) -> None:
        """Forget a finished migration (housekeeping); refuses an unfinished one."""
        with self._locked():
            entry = _entry(self._read(migration_id))
            if not entry.terminal:
                raise JournalError(f"migration {migration_id} is still {entry.phase!r}; "
                                   "only finished migrations can be removed")
            self._file(migration_id).unlink()
            fsync_dir(self.dir)

    # --- files
    def _file(self, migration_id: str) -> Path:
        return self.dir / f"{migration_id}.json"

    def _locked(self):
        return _Locked(self._lock, self.dir / ".lock")

    def _read(self, migration_id: str) -> dict[str, Any]:
        path = self._file(migration_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise JournalError(f"no migration {migration_id} in the journal ({self.dir})") from None
        except OSError as exc:
            raise JournalError(f"{path}: cannot read: {exc.strerror}") from exc
        try:
            doc = json.loads(data)
            if doc["migration_id"] != migration_id or doc["role"] not in ROLES:
                raise ValueError("names another migration or an unknown role")
            phases = [p for p, _ in doc["history"]]
            if not phases or doc["phase"] != phases[-1] or not isinstance(doc["data"], dict):
                raise ValueError("phase and history disagree")
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalError(f"{path}: journal entry is corrupt ({exc})") from exc
        return doc

    def _write(self, migration_id: str, doc: dict[str, Any]) -> None:
        final = self._file(migration_id)
        data = json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"
        try:
            atomic_write(final, data, mode=0o600)
        except OSError as exc:
            raise JournalError(f"{final}: cannot write the journal entry: {exc.strerror or exc}"
                               ) from exc

    def _remove_stale_temp_files(self) -> None:
        # a temp file is a write that crashed before its rename: the state it held never
        # became durable, the previous file is the truth
        with self._locked():
            for tmp in self.dir.glob(".*.json*.tmp"):  # .<id>.json.<pid>.tmp (older: .<id>.json.tmp)
                tmp.unlink(missing_ok=True)


class _Locked:
    """Thread lock + flock on the journal directory's lock file (daemon and `migsec recover`)."""

    def __init__(self, lock: threading.Lock, path: Path) -> None:
        self._lock, self._path, self._fd = lock, path, -1

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as exc:
            self._lock.release()
            raise JournalError(f"{self._path}: cannot lock the journal: {exc.strerror}") from exc

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)
        self._lock.release()


def _check_id(migration_id: str) -> None:
    # the id becomes a file name: refuse anything that could leave the directory
    if not isinstance(migration_id, str) or not _MIGRATION_ID.match(migration_id):
        raise JournalError(f"invalid migration id {migration_id!r} "
                           "(1-128 of A-Z a-z 0-9 _ -, starting with a letter or digit)")


def _check_fields(fields: Mapping[str, Any]) -> None:
    clash = sorted(_RESERVED_FIELDS & set(fields))
    if clash:
        raise JournalError(f"journal field {clash[0]!r} is reserved")
    try:
        json.dumps(fields, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise JournalError(f"journal fields must be plain JSON values: {exc}") from exc


def _entry(doc: dict[str, Any]) -> JournalEntry:
    return JournalEntry(
        migration_id=doc["migration_id"], role=doc["role"], phase=doc["phase"],
        data=MappingProxyType(json.loads(json.dumps(doc["data"]))),
        history=tuple((p, float(t)) for p, t in doc["history"]),
        created=float(doc["created"]), updated=float(doc["updated"]),
    )

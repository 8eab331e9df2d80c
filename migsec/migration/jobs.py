"""The journal store's writer (``record``: what each side's commit machine is given), and the operator's
handles on a running outgoing migration: ``AbortSwitch`` (``migsec jobs abort``) and
``ProgressTracker`` (bytes, rate and ETA in ``migsec jobs``)."""
from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from migsec.errors import JournalError, MigsecError, TransferError
from migsec.migration.journal import DECISION

if TYPE_CHECKING:
    from migsec.daemon.services import Services
    from migsec.migration.journal import JournalEntry

log = logging.getLogger("migsecd.jobs")


def record(services: Services, migration_id: str, role: str, phase: str, **fields: Any) -> None:
    """Advance (creating on first use) a migration's journal entry to ``phase``."""
    journal = services.journal
    clean = {k: v for k, v in fields.items() if v is not None}
    try:
        journal.get(migration_id)
    except JournalError:
        journal.create(migration_id, role, clean)
        first = "requested" if role == "source" else "accepted"
        if phase == first:
            return
    journal.advance(migration_id, phase, **clean)


def journal_writer(services: Services, migration_id: str, role: str) -> Callable[..., None]:
    """The journal of one side of one migration, as its commit machine writes it."""
    def write(phase: str, **fields: Any) -> None:
        record(services, migration_id, role, phase, **fields)

    return write


def describe(entry: JournalEntry) -> dict:
    data = dict(entry.data)
    return {
        "migration_id": entry.migration_id,
        "role": entry.role,
        "phase": entry.phase,
        "domain": data.get("domain", ""),
        "peer": data.get("peer", ""),
        "user": data.get("user", ""),
        "created": _iso(entry.created),
        "updated": _iso(entry.updated),
        "reason": data.get("reason"),
        "history": [p for p, _ in entry.history],
        # source after --undefinesource: disks still here ({"path", "error"} each)
        "disks_not_removed": list(data.get("disks_not_removed") or []),
        # source without --undefinesource: the kept definition is marked as given away
        "marked": bool(data.get("marked")),
    }


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# ---- a running outgoing migration: abort and progress (``migsec jobs abort``, ``jobs --watch``) ----
class AbortRefusedError(MigsecError):
    """The migration cannot be aborted (decided commit, finished, not running here, not ours)."""


class AbortSwitch:
    """An operator's abort of one outgoing migration, raced safely against A's commit decision.

    The source checks ``check()`` where it checks ``--timeout`` (so an abort rolls back the
    same way). The cold flow's commit machine journals through ``guard(phase)``: its
    ``committed`` (the decision it is about to make) then fails if an abort came first, and an
    abort after it is refused. Every other journal write goes through ``note(phase)``, which
    never fails: a commit decided elsewhere (libvirt's, in a live move) is only recorded.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None
        self.decided = False
        self._why = ("the source has decided commit: the migration completes at the destination and "
                     "can no longer be aborted")

    def request(self, reason: str) -> None:
        with self._lock:
            if self.decided:
                raise AbortRefusedError(self._why)
            if self.reason is None:
                self.reason = reason

    def past_return(self, why: str) -> bool:
        """Nothing can roll the move back any more (a live move: libvirt stopped the source copy):
        later aborts are refused with ``why``. False if an abort was requested and came too late."""
        with self._lock:
            self.decided, self._why = True, why
            return self.reason is None

    def check(self) -> None:
        if self.reason is not None:
            raise MigrationAborted(self.reason)

    def guard(self, phase: str) -> None:
        """Before journaling ``phase`` as the decision maker: an earlier abort wins over commit."""
        if phase != DECISION["source"]:
            return
        with self._lock:
            self.check()
            self.decided = True

    def note(self, phase: str) -> None:
        """A phase was journaled: from ``committed`` on, aborts are refused. Never raises."""
        if phase == DECISION["source"]:
            with self._lock:
                self.decided = True


class MigrationAborted(TransferError):
    """An operator aborted the migration (``migsec jobs abort`` or Ctrl-C of ``migsec migrate``)."""


class ProgressTracker:
    """The last progress event of a running migration, with a rate over the last seconds."""

    WINDOW_S = 5.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, int]] = deque()
        self.phase, self.done, self.total = "", 0, 0

    def update(self, phase: str, done: int, total: int) -> None:
        now = self._clock()
        with self._lock:
            self.phase, self.done, self.total = phase, done, total
            self._samples.append((now, done))
            while len(self._samples) > 2 and now - self._samples[0][0] > self.WINDOW_S:
                self._samples.popleft()

    def snapshot(self) -> dict | None:
        """``phase, done, total (0 = not known yet), rate (bytes/s), eta (s or None)``."""
        with self._lock:
            if not self._samples:
                return None
            (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
            rate = (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0
            known = self.total > 0 and self.total >= self.done
            eta = (self.total - self.done) / rate if known and rate > 0 else None
            return {"phase": self.phase, "done": self.done, "total": self.total if known else 0,
                    "rate": round(rate, 1), "eta": None if eta is None else round(eta, 1)}


def find_running(services: Services, *, migration_id: str | None = None, domain: str | None = None) -> Any:
    """The running outgoing job named by its id (or a unique prefix of it) or by its domain."""
    with services.lock:
        jobs = dict(services.running)
    if migration_id:
        found = [j for mid, j in jobs.items() if mid.startswith(migration_id)]
        if len(found) > 1:
            raise AbortRefusedError(f"{migration_id!r} names {len(found)} running migrations: give more of the id")
        if found:
            return found[0]
        _explain_not_running(services, migration_id)
    found = [j for j in jobs.values() if getattr(j, "domain", None) == domain]
    if not found:
        raise AbortRefusedError(f"no migration of {domain} is running here")
    return found[0]


def _explain_not_running(services: Services, migration_id: str) -> None:
    entries = [e for e in services.journal.list() if e.migration_id.startswith(migration_id)]
    if not entries:
        raise AbortRefusedError(f"no migration {migration_id} in the journal (`migsec jobs --all` lists them)")
    entry = entries[0]
    if entry.role != "source":
        raise AbortRefusedError(f"migration {entry.migration_id} is incoming: abort it on its source host "
                                f"({entry.data.get('peer')}), which decides")
    if entry.decided:
        raise AbortRefusedError(f"migration {entry.migration_id} is past the commit decision ({entry.phase}): "
                                f"{entry.data.get('domain')} belongs to {entry.data.get('peer')} now")
    if entry.terminal:
        raise AbortRefusedError(f"migration {entry.migration_id} already ended ({entry.phase})")
    raise AbortRefusedError(f"migration {entry.migration_id} is not running in this migsecd (stopped in "
                            f"phase {entry.phase}): `migsec recover` rolls it back")


def abort_running(services: Services, *, migration_id: str | None, domain: str | None, reason: str,
                  wait: float = 0.0) -> dict:
    """Ask a running outgoing migration to roll back; with ``wait``, until it has (seconds)."""
    job = find_running(services, migration_id=migration_id, domain=domain)
    switch = getattr(job, "abort", None)
    if switch is None:
        raise AbortRefusedError(f"migration {job.mid} cannot be aborted")
    # a live move: the live flow's watcher aborts libvirt's job, libvirt rolls back (until
    # libvirt's Confirm, which is the commit and then refuses the abort as `committed` does)
    switch.request(reason)
    log.warning("%s: abort requested: %s", job.mid, reason)
    deadline = time.monotonic() + wait
    while wait and job.mid in services.running and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        phase = services.journal.get(job.mid).phase
    except JournalError:
        phase = "requested"
    return {"migration_id": job.mid, "domain": job.domain, "phase": phase,
            "finished": job.mid not in services.running}

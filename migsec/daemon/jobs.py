"""Journal helpers shared by the source, destination and recovery code."""
from __future__ import annotations

import datetime as _dt
from typing import Any

from migsec.errors import JournalError


def record(services: Any, migration_id: str, role: str, phase: str, **fields: Any) -> None:
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


def describe(entry: Any) -> dict:
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

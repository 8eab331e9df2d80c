"""Permits for migsec's own incoming live migrations, checked by the ``migrate begin`` hook.

libvirt runs the ``migrate begin`` hook on the destination for every incoming native
migration; the hook refuses all of them (VMs arrive only through migsec) except one
that B's migsecd announced: before it lets the source's libvirt in, migsecd writes
``<state_dir>/permits/<uuid>.json`` naming the migration id, the domain and an expiry.
The hook (which must never call libvirt) accepts an incoming domain only with an
unexpired permit for its uuid and name, and consumes it, so one permit admits one
migration. Plain files, no migsec imports beyond errors and fsutil: the hook stays small.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from migsec.errors import MigsecError
from migsec.fsutil import atomic_write

_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


class PermitError(MigsecError):
    """No usable permit for an incoming migration."""


def _path(directory: Path, uuid: str) -> Path:
    if not _UUID.match(uuid or ""):
        raise PermitError(f"not a domain uuid: {uuid!r}")
    return Path(directory) / f"{uuid.lower()}.json"


def write_permit(directory: Path, *, migration_id: str, uuid: str, name: str, ttl: float,
                 now: float | None = None) -> Path:
    """Permit one incoming migration of ``uuid``/``name`` for ``ttl`` seconds (0600, root's)."""
    Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
    path = _path(directory, uuid)
    issued = time.time() if now is None else now
    body = {"migration_id": migration_id, "uuid": uuid.lower(), "name": name, "expires": issued + ttl}
    atomic_write(path, json.dumps(body, sort_keys=True).encode(), mode=0o600)
    return path


def check_and_consume(directory: Path, *, uuid: str | None, name: str, now: float | None = None) -> str:
    """The migration id of the permit for this incoming domain (removed now); PermitError if none."""
    if not uuid:
        raise PermitError("the incoming domain XML has no uuid")
    path = _path(directory, uuid)
    try:
        st = path.lstat()
        if not path.is_file() or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermitError(f"permit {path} is not a private file of this user; ignored")
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise PermitError(f"no migsec permit for domain {name!r} ({uuid})") from None
    except (OSError, ValueError) as exc:
        raise PermitError(f"unreadable permit {path}: {exc}") from exc
    try:
        path.unlink()  # consumed whatever it says: one permit, one look
    except OSError:
        pass
    if not isinstance(body, dict) or body.get("uuid") != uuid.lower() or body.get("name") != name:
        raise PermitError(f"the permit for {uuid} names another domain ({body.get('name')!r})")
    expires = body.get("expires")
    if not isinstance(expires, (int, float)) or (time.time() if now is None else now) > expires:
        raise PermitError(f"the permit for domain {name!r} expired")
    mid = body.get("migration_id")
    if not isinstance(mid, str) or not mid:
        raise PermitError(f"the permit for domain {name!r} names no migration")
    return mid


def remove_permit(directory: Path, uuid: str) -> None:
    try:
        _path(directory, uuid).unlink()
    except (FileNotFoundError, PermitError):
        pass

"""Local operations of migsecd (what ``migsec`` asks over the unix socket).

Each handler runs in a worker thread: ``handler(daemon, message, emit) -> dict``
where ``emit(event)`` streams progress events to the client and the returned
dict is merged into the final ``{"ok": true, ...}`` reply.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from migsec.auth.servers import AuthenticationServer, AuthorizationServer
from migsec.errors import MalformedMessageError, MigrationFailed
from migsec.migration.jobs import ProgressTracker, abort_running
from migsec.migration.peers import find_peer
from migsec.migration.recovery import list_jobs, recover_all
from migsec.migration.source import OutgoingMigration

log = logging.getLogger("migsecd")
Emit = Callable[[dict], None]


def _field(message: dict, name: str, kind: type) -> Any:
    value = message.get(name)
    if not isinstance(value, kind):
        raise MalformedMessageError(f"local request: field {name!r} missing or not {kind.__name__}")
    return value


def ping(daemon, message: dict, emit: Emit) -> dict:
    return {"did": daemon.services.did}


def login(daemon, message: dict, emit: Emit) -> dict:
    """Paper step 1-2: AuthReq -> AuthReply + Auth_Tkt (the AS)."""
    server = AuthenticationServer(daemon.services)
    return server.handle(_field(message, "request", str))


def resolve(daemon, message: dict, emit: Emit) -> dict:
    """Which peer domain a migsec://HOST:PORT names (the client needs Dest_DID for step 3)."""
    peer = find_peer(daemon.services, _field(message, "host", str), _field(message, "port", int))
    return {"did": peer.did, "address": peer.address}


def migrate(daemon, message: dict, emit: Emit) -> dict:
    """Paper step 3-4 (the AZ), then the VMM agent runs the inter-domain migration."""
    az = AuthorizationServer(daemon.services)
    grant = az.authorize(_field(message, "request", str))
    # the id lets the client abort it (Ctrl-C) and find it in `migsec jobs`
    emit({"event": "step", "migration_id": grant.migration_id, "message": f"authorized by "
          f"{daemon.services.did}: {grant.request.vm} -> {grant.destination_did} (migration {grant.migration_id})"})
    services = daemon.services
    tracker = ProgressTracker()

    def tracked(event: dict) -> None:
        if event.get("event") == "progress":
            tracker.update(str(event.get("phase", "")), int(event.get("done", 0)), int(event.get("total", 0)))
        emit(event)

    with services.lock:
        if any(j.domain == grant.request.vm for j in services.running.values()):
            raise MigrationFailed(f"{grant.request.vm} is already being migrated")
        job = OutgoingMigration(services, grant, tracked)
        job.tracker = tracker
        services.running[grant.migration_id] = job
    with daemon.active:
        try:
            return {"result": job.run()}
        finally:
            services.running.pop(grant.migration_id, None)


def jobs(daemon, message: dict, emit: Emit) -> dict:
    rows = list_jobs(daemon.services, show_all=bool(message.get("all")))
    for row in rows:
        job = daemon.services.running.get(row["migration_id"])
        tracker = getattr(job, "tracker", None)
        if tracker is not None:
            row["progress"] = tracker.snapshot()
    return {"jobs": rows}


def abort(daemon, message: dict, emit: Emit) -> dict:
    """Roll back a running outgoing migration, as --timeout would; refused once A decided commit.

    ``migration_id`` (or a unique prefix) or ``domain``; ``wait`` = seconds to wait for the
    rollback to finish (0: return at once, the migration's own client reports it)."""
    mid, domain = message.get("migration_id"), message.get("domain")
    if not (isinstance(mid, str) and mid) and not (isinstance(domain, str) and domain):
        raise MalformedMessageError("local request: abort needs 'migration_id' or 'domain'")
    wait = message.get("wait", 0)
    if not isinstance(wait, (int, float)) or not 0 <= wait <= 3600:
        raise MalformedMessageError("local request: 'wait' must be 0..3600 seconds")
    by = message.get("by")
    how = by if isinstance(by, str) else "migsec jobs abort"
    return abort_running(daemon.services, migration_id=mid if isinstance(mid, str) else None,
                         domain=domain if isinstance(domain, str) else None,
                         reason=f"aborted by the operator ({how[:64]})", wait=float(wait))


def recover(daemon, message: dict, emit: Emit) -> dict:
    return {"actions": recover_all(daemon.services, emit)}


LOCAL_OPS: dict[str, Callable[[Any, dict, Emit], dict]] = {
    "ping": ping,
    "login": login,
    "resolve": resolve,
    "migrate": migrate,
    "jobs": jobs,
    "abort": abort,
    "recover": recover,
}

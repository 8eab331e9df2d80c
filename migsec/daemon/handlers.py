"""Local operations of migsecd (what ``migsec`` asks over the unix socket).

Each handler runs in a worker thread: ``handler(daemon, message, emit) -> dict``
where ``emit(event)`` streams progress events to the client and the returned
dict is merged into the final ``{"ok": true, ...}`` reply.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from migsec.errors import MalformedMessageError, MigrationFailed

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
    from migsec.auth.servers import AuthenticationServer

    server = AuthenticationServer(daemon.services)
    return server.handle(_field(message, "request", str))


def resolve(daemon, message: dict, emit: Emit) -> dict:
    """Which peer domain a migsec://HOST:PORT names (the client needs Dest_DID for step 3)."""
    from migsec.daemon.peers import find_peer

    peer = find_peer(daemon.services, _field(message, "host", str), _field(message, "port", int))
    return {"did": peer.did, "address": peer.address}


def migrate(daemon, message: dict, emit: Emit) -> dict:
    """Paper step 3-4 (the AZ), then the VMM agent runs the inter-domain migration."""
    from migsec.auth.servers import AuthorizationServer
    from migsec.daemon.source import OutgoingMigration

    az = AuthorizationServer(daemon.services)
    grant = az.authorize(_field(message, "request", str))
    emit({"event": "step", "message": f"authorized by {daemon.services.did}: "
          f"{grant.request.vm} -> {grant.destination_did}"})
    services = daemon.services
    with services.lock:
        if any(j.domain == grant.request.vm for j in services.running.values()):
            raise MigrationFailed(f"{grant.request.vm} is already being migrated")
        job = OutgoingMigration(services, grant, emit)
        services.running[grant.migration_id] = job
    with daemon.active:
        try:
            return {"result": job.run()}
        finally:
            services.running.pop(grant.migration_id, None)


def jobs(daemon, message: dict, emit: Emit) -> dict:
    from migsec.daemon.recovery import list_jobs

    return {"jobs": list_jobs(daemon.services, show_all=bool(message.get("all")))}


def recover(daemon, message: dict, emit: Emit) -> dict:
    from migsec.daemon.recovery import recover_all

    return {"actions": recover_all(daemon.services, emit)}


LOCAL_OPS: dict[str, Callable[[Any, dict, Emit], dict]] = {
    "ping": ping,
    "login": login,
    "resolve": resolve,
    "migrate": migrate,
    "jobs": jobs,
    "recover": recover,
}

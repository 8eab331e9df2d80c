"""After the commit: what happens to the source's copy, and ``migsec release``.

``release_source`` runs where the source releases its copy (the live flow and ``migsec
recover``): the guest is destroyed here; with ``--undefinesource`` its definition is
undefined and its top disk images removed, and a disk that could not be removed is
reported (result, journal, ``migsec jobs``), not only logged; without it the kept
definition is marked as given away (``migsec.handover``), so the libvirt hook refuses to
start it until an operator runs ``migsec release DOMAIN``.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from migsec import virt
from migsec.audit import Ledger
from migsec.errors import MigsecError
from migsec.handover import MovedMark
from migsec.migration.dataplane import request_files_of
from migsec.migration.jobs import record
from migsec.migration.source import domain_state
from migsec.pki.identity import DomainIdentity
from migsec.protocol.plan import MigrationPlan

if TYPE_CHECKING:
    from migsec.migration.journal import JournalEntry
    from migsec.daemon.services import Services

log = logging.getLogger("migsecd.release")


def release_source(services: Services, conn: Any, migration_id: str, domain: str, options: dict,
                   destination: str, *, plan: MigrationPlan | None = None) -> dict:
    """Release this host's copy; returns what to report: ``disks_not_removed`` (``[{"path",
    "error"}]``), ``marked`` (the kept definition carries the mark) and ``errors``. The disks
    removed (--undefinesource) are the ``plan``'s top images, else the options' ``top_files``."""
    report: dict[str, Any] = {"disks_not_removed": [], "marked": False, "errors": []}
    undefine = bool(options.get("undefine_source"))
    try:
        if domain_state(conn, domain) not in ("shutoff", "absent"):
            virt.destroy_domain(conn, domain)
        if undefine and domain_state(conn, domain) != "absent":
            virt.undefine_domain(conn, domain)
        elif not undefine and domain_state(conn, domain) == "shutoff":
            at = services.clock().astimezone(dt.timezone.utc)
            mark = MovedMark(migration_id, destination, at.strftime("%Y-%m-%dT%H:%M:%SZ"))
            virt.mark_moved(conn, domain, mark)
            report["marked"] = True
    except MigsecError as exc:
        log.error("releasing %s after commit: %s", domain, exc)
        report["errors"].append(str(exc))
    if report["marked"]:
        try:
            services.audit("given-away", migration_id, role="source", domain=domain, destination=destination)
        except MigsecError as exc:
            log.error("auditing that %s was given away: %s", domain, exc)
    if undefine:
        report["disks_not_removed"] = remove_moved_disks(options, plan)
    fields = {k: v for k, v in report.items() if v}
    if fields:
        try:
            phase = services.journal.get(migration_id).phase
            record(services, migration_id, "source", phase, **fields)
        except MigsecError as exc:
            log.error("journalling the release of %s: %s", domain, exc)
    return report


def remove_moved_disks(options: Mapping[str, Any], plan: MigrationPlan | None = None) -> list[dict]:
    """With --undefinesource the VM moved: its top disk files (verified by B's receipt) go too.
    Returns the ones that could not be removed, each with why."""
    failed = []
    paths = list(plan.top_files) if plan is not None else request_files_of(options, "top_files")
    for path in paths:
        try:
            Path(path).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("removing the moved disk %s: %s", path, exc.strerror or exc)
            failed.append({"path": path, "error": exc.strerror or str(exc)})
    return failed


def journal_plan(entry: JournalEntry) -> MigrationPlan | None:
    """The plan a source journal recorded when authorized (None for an entry written without one)."""
    raw = entry.data.get("plan")
    return MigrationPlan.from_dict(raw) if raw is not None else None


def release_domain(config: Any, domain: str, *, operator: str) -> Any:
    """``migsec release DOMAIN``: clear the given-away mark on the kept definition, audited.
    Returns the mark that was removed; MigsecError if there is none."""
    with virt.connect(config.libvirt.uri) as conn:
        mark = virt.clear_moved(conn, domain)
    if mark is None:
        raise MigsecError(f"domain {domain!r} carries no migsec 'given away' mark: nothing to release")
    identity = DomainIdentity.load(config.domain.key, config.domain.certificate)
    Ledger(config.paths.ledger, identity).append(
        "vm-release", mark.migration_id,
        {"domain": domain, "destination": mark.destination, "moved_at": mark.at, "operator": operator},
        source="migsec release")
    return mark

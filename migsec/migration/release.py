"""A's copy of the guest in one migration: run it again (before the commit) or release it
(after), and ``migsec release``.

``SourceCopy`` is what the source's commit machine (``migsec.transfer.commit.SourceCommit``) is
given as its ``resume_vm`` / ``release_vm``, built from the running migration
(``OutgoingMigration.copy``) or from its journal (``migsec recover``), so both do the same.
``release_copy`` destroys the guest here; with ``--undefinesource`` its definition is undefined
and its top disk images removed, and a disk that could not be removed is reported (result,
journal, ``migsec jobs``), not only logged; without it the kept definition is marked as given
away (``migsec.handover``), so the libvirt hook refuses to start it until an operator runs
``migsec release DOMAIN``.
"""
from __future__ import annotations

import datetime as dt
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from migsec import virt
from migsec.audit import Ledger
from migsec.errors import DomainNotFoundError, MigrationFailed, MigsecError
from migsec.handover import MovedMark
from migsec.migration.jobs import record
from migsec.pki.identity import DomainIdentity
from migsec.protocol.plan import MigrationPlan

if TYPE_CHECKING:
    from migsec.migration.journal import JournalEntry
    from migsec.daemon.services import Services

log = logging.getLogger("migsecd.release")


@dataclass
class SourceCopy:
    """The guest at A in one migration, and where its save image and work files are."""

    services: Services
    migration_id: str
    domain: str
    destination: str
    options: Mapping[str, Any]
    plan: MigrationPlan
    work_dir: Path | None = None
    save_image: Path | None = None
    was_paused: bool = False

    @classmethod
    def from_journal(cls, services: Services, entry: JournalEntry) -> SourceCopy:
        """As the source journal recorded it (every source journal names its domain and peer)."""
        data = entry.data
        return cls(services, entry.migration_id, str(data.get("domain")), str(data.get("peer")),
                   dict(data.get("options") or {}), entry.plan(),
                   Path(data["work_dir"]) if data.get("work_dir") else None,
                   Path(data["save_image"]) if data.get("save_image") else None,
                   bool(data.get("was_paused")))

    def restart(self, conn: Any = None) -> str:
        """Before the decision: the guest runs here again as it was; returns how. A live move's
        copy is never restored from an image (there is none): one libvirt's Confirm stopped
        stays stopped, its disks kept (``restart_live_source``)."""
        with _connection(self.services, conn) as c:
            if self.plan.mode == "live":
                how = restart_live_source(c, self.domain, was_paused=self.was_paused)
            else:
                how = restart_at_source(c, self.domain, self.save_image, paused=self.was_paused)
        self._remove_work_dir()
        return how

    def release(self, conn: Any = None) -> dict:
        """After the decision: destroy (and undefine / mark) the copy here; returns the report
        of ``release_copy``."""
        with _connection(self.services, conn) as c:
            report = release_copy(self.services, c, self.migration_id, self.domain, self.options,
                                  self.destination, plan=self.plan)
        self._remove_work_dir()
        return report

    def _remove_work_dir(self) -> None:
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)


class _connection:
    """``conn`` as is, or a new connection to this host's libvirt, closed afterwards."""

    def __init__(self, services: Services, conn: Any) -> None:
        self.services, self.conn = services, conn
        self.own: Any = None

    def __enter__(self) -> Any:
        if self.conn is not None:
            return self.conn
        self.own = virt.connect(self.services.config.libvirt.uri)
        return self.own

    def __exit__(self, *exc: object) -> None:
        if self.own is not None:
            self.own.close()


def journal_fields(report: Mapping[str, Any]) -> dict:
    """What of a release report goes into the journal (only what is not empty)."""
    return {k: v for k, v in report.items() if v}


def release_copy(services: Services, conn: Any, migration_id: str, domain: str, options: Mapping[str, Any],
                 destination: str, *, plan: MigrationPlan) -> dict:
    """Release this host's copy; returns what to report: ``disks_not_removed`` (``[{"path",
    "error"}]``), ``marked`` (the kept definition carries the mark) and ``errors``. The disks
    removed (--undefinesource) are the ``plan``'s top images.
    Writes no journal: the caller's commit machine journals the report with "released"."""
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
        report["disks_not_removed"] = remove_moved_disks(plan)
    return report


def domain_state(conn: Any, domain: str) -> str:
    """The domain's state by virsh's name, or "absent" when libvirt does not know it."""
    try:
        return virt.domain_state(conn, domain).value
    except DomainNotFoundError:
        return "absent"


def restart_at_source(conn: Any, domain: str, saved_image: Path | None, *, paused: bool = False) -> str:
    """Put the guest back in its state at A (running, or paused if it was), whatever point the
    source side reached."""
    state = domain_state(conn, domain)
    if state == "running":
        return "kept running"
    if state == "paused":
        if paused:
            return "kept paused (as it was)"
        virt.resume_domain(conn, domain)
        return "resumed"
    if saved_image is not None and Path(saved_image).exists():
        virt.restore_domain(conn, str(saved_image), paused=paused)
        return "restored from its save image" + (" (paused, as it was)" if paused else "")
    raise MigrationFailed(f"{domain} is {state} at the source and no save image is left to restore it from")


def restart_live_source(conn: Any, domain: str, *, was_paused: bool) -> str:
    """After an abort: the guest as it was at A. libvirt's rollback resumed it already; one it
    left paused is resumed (safe: B never runs its copy without A's commit). A copy libvirt's
    Confirm already stopped is not booted again (a reboot is not a rollback): its disks stay."""
    state = domain_state(conn, domain)
    if state in ("absent", "shutoff"):
        log.error("%s is %s here after an abort: libvirt's Confirm stopped it; its disks are kept", domain, state)
        return f"stopped (libvirt ended it here, {state}; its disks are kept: start it by hand)"
    return restart_at_source(conn, domain, None, paused=was_paused)


def remove_moved_disks(plan: MigrationPlan) -> list[dict]:
    """With --undefinesource the VM moved: its top disk files (verified by B's receipt) go too,
    never a backing file (it may be shared). Returns the ones that could not be removed, each
    with why."""
    failed = []
    for path in plan.top_files:
        try:
            Path(path).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("removing the moved disk %s: %s", path, exc.strerror or exc)
            failed.append({"path": path, "error": exc.strerror or str(exc)})
    return failed


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

"""libvirt's own live migration, peer to peer, over sockets migsec provides.

migsec does not move a live guest's memory itself: libvirt and QEMU do (pre-copy,
dirty-page tracking, the NBD disk mirror), and migsec carries their three
connections (the libvirt RPC to the destination's daemon, QEMU's migration stream,
the NBD mirror) through its keyed session as byte channels. This module is the
libvirt side of it: ``migrate_live`` (``virDomainMigrateToURI3``), the job's
figures, and sparse pre-creation of the destination's disks with qemu-img.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

import libvirt

from migsec.errors import MigsecError
from migsec.virt.connection import Connection, lookup
from migsec.virt.errors import OperationUnsupportedError, libvirt_call
from migsec.virt.images import QEMU_IMG, _check_format, _run

MIB = 1024 * 1024


def _flag(name: str) -> int:
    value = getattr(libvirt, name, None)
    if value is None:
        raise OperationUnsupportedError(f"live migration: libvirt-python here lacks {name}")
    return int(value)


def live_flags(*, persistent: bool, undefine_source: bool) -> int:
    """LIVE | PEER2PEER | NON_SHARED_DISK | PAUSED, plus PERSIST_DEST / UNDEFINE_SOURCE as asked.

    Always PAUSED: the destination's Finish leaves the guest paused, and migsec resumes it
    there only after the source's signed commit. Without it a Finish whose reply is lost
    would run the guest at B while libvirt's Confirm(cancelled) resumes it at A.
    """
    flags = (_flag("VIR_MIGRATE_LIVE") | _flag("VIR_MIGRATE_PEER2PEER") | _flag("VIR_MIGRATE_NON_SHARED_DISK")
             | _flag("VIR_MIGRATE_PAUSED"))
    if persistent:
        flags |= _flag("VIR_MIGRATE_PERSIST_DEST")
    if undefine_source:
        flags |= _flag("VIR_MIGRATE_UNDEFINE_SOURCE")
    return flags


def migrate_live(conn: Connection, name_or_uuid: str, *, dconnuri: str, migrate_uri: str, disks_uri: str,
                 flags: int, bandwidth: int | None = None, disks: list[str] | None = None) -> None:
    """``virDomainMigrateToURI3`` (blocks until libvirt's Finish/Confirm, or its rollback).

    ``bandwidth`` in bytes/s (libvirt takes MiB/s and also throttles the NBD mirror
    with it); ``disks``: the targets to mirror (default: every writable disk).
    A failure is a VirtError; libvirt has then resumed the guest at the source.
    """
    dom = lookup(conn, name_or_uuid)
    params: dict = {
        libvirt.VIR_MIGRATE_PARAM_URI: migrate_uri,
        libvirt.VIR_MIGRATE_PARAM_DISKS_URI: disks_uri,
    }
    if bandwidth:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, int(bandwidth) // MIB)
    if disks:
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(disks)
    with libvirt_call("live migration", uri=conn.uri, domain=name_or_uuid):
        dom.migrateToURI3(dconnuri, params, flags)


@dataclass(frozen=True)
class JobStats:
    """What libvirt reports of a migration job (``virsh domjobinfo``); None where it said nothing."""

    time_elapsed_ms: int | None
    downtime_ms: int | None
    memory_processed: int | None
    memory_total: int | None
    memory_bps: int | None
    disk_processed: int | None
    disk_total: int | None
    data_processed: int | None
    data_total: int | None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def job_stats(conn: Connection, name_or_uuid: str, *, completed: bool = False) -> JobStats | None:
    """The running (or, with ``completed``, the last completed) job's figures; None if none."""
    flags = getattr(libvirt, "VIR_DOMAIN_JOB_STATS_COMPLETED", 0) if completed else 0
    try:
        dom = lookup(conn, name_or_uuid)
        with libvirt_call("job statistics", uri=conn.uri, domain=name_or_uuid):
            stats = dom.jobStats(flags)
    except MigsecError:  # statistics are informative only; a vanished domain has none
        return None
    if not stats:
        return None

    def get(key: str) -> int | None:
        value = stats.get(key)
        return int(value) if isinstance(value, int) else None

    return JobStats(time_elapsed_ms=get("time_elapsed"), downtime_ms=get("downtime"),
                    memory_processed=get("memory_processed"), memory_total=get("memory_total"),
                    memory_bps=get("memory_bps"), disk_processed=get("disk_processed"),
                    disk_total=get("disk_total"), data_processed=get("data_processed"),
                    data_total=get("data_total"))


def migration_running(conn: Connection, name_or_uuid: str) -> bool:
    """Whether libvirt still runs a job (e.g. a migration) for the domain; False if it is unknown."""
    try:
        dom = lookup(conn, name_or_uuid)
        with libvirt_call("job info", uri=conn.uri, domain=name_or_uuid):
            kind = dom.jobInfo()[0]
    except MigsecError:
        return False
    return kind in (getattr(libvirt, "VIR_DOMAIN_JOB_BOUNDED", 1), getattr(libvirt, "VIR_DOMAIN_JOB_UNBOUNDED", 2))


def is_persistent(conn: Connection, name_or_uuid: str) -> bool | None:
    """Whether the domain has a persistent definition here; None if libvirt does not know it."""
    try:
        dom = lookup(conn, name_or_uuid)
        with libvirt_call("is persistent", uri=conn.uri, domain=name_or_uuid):
            return bool(dom.isPersistent())
    except MigsecError:
        return None


def abort_job(conn: Connection, name_or_uuid: str) -> None:
    """Cancel the domain's running job (libvirt then rolls the migration back)."""
    dom = lookup(conn, name_or_uuid)
    with libvirt_call("abort job", uri=conn.uri, domain=name_or_uuid):
        dom.abortJob()


def create_sparse_image(path: str, *, format: str, virtual_size: int) -> None:
    """A new, empty image of ``virtual_size`` bytes (``qemu-img create``; nothing allocated).

    Refuses an existing file: the destination path of a live move must never be
    the source's own image (the lab's image directories are visible from both hosts).
    """
    what = f"create image '{path}'"
    if os.path.lexists(path):
        raise OperationUnsupportedError(f"{what}: a file is already there; refusing to overwrite it")
    if not isinstance(virtual_size, int) or virtual_size <= 0:
        raise OperationUnsupportedError(f"{what}: bad virtual size {virtual_size!r}")
    _run([QEMU_IMG, "create", "-q", "-f", _check_format(format, what), path, str(virtual_size)], what)


QEMU_CONF = Path("/etc/libvirt/qemu.conf")
_SETTING = re.compile(r'^(#?)\s*(user|group)\s*=\s*"([^"]*)"\s*$')


@dataclass(frozen=True)
class QemuOwner:
    """The uid and gid libvirt's system instance runs QEMU as (qemu.conf ``user``/``group``)."""

    uid: int
    gid: int


def _resolve(value: str, by_name, field: str) -> int | None:
    """libvirt's rule: a name first, then a number; ``+N`` is always a number."""
    if value.startswith("+") and value[1:].isdigit():
        return int(value[1:])
    try:
        return int(getattr(by_name(value), field))
    except KeyError:
        return int(value) if value.isdigit() else None


def qemu_owner(text: str) -> QemuOwner | None:
    """Who QEMU runs as according to a qemu.conf's ``text``; None when that is root.

    A setting left commented out means libvirt's build-time default, which the packaged file
    shows as the commented line (``#user = "libvirt-qemu"`` on Debian). An unresolvable
    name is a MigsecError: the migration's sockets could not be given to the right user.
    """
    found: dict[str, str] = {}
    defaults: dict[str, str] = {}
    for line in text.splitlines():
        m = _SETTING.match(line.strip())
        if m:
            (defaults if m.group(1) else found)[m.group(2)] = m.group(3)
    user = found.get("user", defaults.get("user", "root"))
    group = found.get("group", defaults.get("group", "root"))
    uid = _resolve(user, pwd.getpwnam, "pw_uid")
    gid = _resolve(group, grp.getgrnam, "gr_gid")
    if uid is None or gid is None:
        raise MigsecError(f"qemu.conf: QEMU runs as user {user!r}, group {group!r}, which this host does not know")
    if uid == 0 and gid == 0:
        return None
    return QemuOwner(uid, gid)


def system_qemu_owner(path: Path = QEMU_CONF) -> QemuOwner | None:
    """``qemu_owner`` of this host's qemu.conf (None if it runs QEMU as root or is unreadable)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return qemu_owner(text)

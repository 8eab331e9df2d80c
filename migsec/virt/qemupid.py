"""The source QEMU's exit, the earliest proof that a live move's source copy is gone.

After B's successful Finish3 reply, A's libvirtd runs its Confirm: it stops the source
QEMU (SIGTERM) and then polls for its exit every 200 ms (libvirt 9.0's
``virProcessKillPainfully``) before ``migrateToURI3`` returns. A QEMU process that has
exited can never be resumed by anyone, so A's migsecd watches the process itself
(a pidfd: readable the moment it exits, before anyone reaps it) and commits then,
instead of a poll interval later.

The QEMU is found from libvirt's pid file for the domain (``/run/libvirt/qemu/<name>.pid``
for ``qemu:///system``) and accepted only if its command line names the domain's UUID, so
a reused pid or a stale file is never mistaken for it. Where that fails (another driver or
run directory, no pidfd), ``watch_exit`` returns None and the caller waits for libvirt.
"""
from __future__ import annotations

import logging
import os
import select
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

log = logging.getLogger("migsec.virt.qemupid")
SYSTEM_RUN_DIR = Path("/run/libvirt/qemu")


def run_dir_for(uri: str) -> Path | None:
    """libvirt's QEMU state directory for ``uri`` when it is a local system connection."""
    parts = urlsplit(uri)
    if parts.scheme in ("qemu", "qemu+unix") and not parts.netloc and parts.path == "/system":
        return SYSTEM_RUN_DIR
    return None


def _names_uuid(pid: int, uuid: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    want = uuid.lower().encode()
    return any(arg.lower() == want for arg in argv) and b"-uuid" in argv


class ExitWatch:
    """A pidfd on one QEMU; ``on_exit()`` is called once, from a thread, when it exits."""

    def __init__(self, pid: int, pidfd: int, on_exit: Callable[[], None]) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._stop_r, self._stop_w = os.pipe()
        self._closed = False
        self.exited = threading.Event()
        self._on_exit = on_exit
        threading.Thread(target=self._run, name=f"migsec-qemu-{pid}", daemon=True).start()

    def _run(self) -> None:
        try:
            ready, _, _ = select.select([self._pidfd, self._stop_r], [], [])
            if self._pidfd in ready and not self._closed:  # close() sets _closed before it wakes us
                self.exited.set()
                self._on_exit()
        finally:
            for fd in (self._pidfd, self._stop_r):
                os.close(fd)

    def close(self) -> None:
        """Stop watching (idempotent): from now on ``on_exit`` is not called."""
        self._closed = True
        if self._stop_w >= 0:
            try:
                os.write(self._stop_w, b"x")
            except OSError:
                pass  # the watcher ended already (QEMU exited)
            os.close(self._stop_w)
            self._stop_w = -1


def watch_exit(uri: str, name: str, uuid: str, on_exit: Callable[[], None], *,
               run_dir: Path | None = None) -> ExitWatch | None:
    """Watch the running QEMU of domain ``name``/``uuid`` on this host, or None (logged) when it
    cannot be identified for certain."""
    base = run_dir if run_dir is not None else run_dir_for(uri)
    if base is None:
        log.info("QEMU's exit cannot be watched through %s: the commit waits for libvirt's Confirm", uri)
        return None
    try:
        pid = int((base / f"{name}.pid").read_text().strip())
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError, AttributeError) as exc:
        log.info("QEMU of %s not found for watching its exit (%s): the commit waits for libvirt's Confirm",
                 name, exc)
        return None
    if not _names_uuid(pid, uuid):  # checked after pidfd_open: the pidfd is this very process
        os.close(pidfd)
        log.info("pid %d is not the QEMU of %s (%s): the commit waits for libvirt's Confirm", pid, name, uuid)
        return None
    return ExitWatch(pid, pidfd, on_exit)

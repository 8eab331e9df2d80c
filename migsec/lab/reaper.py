"""``python -m migsec.lab.reaper STATUS -- CMD...``: start a lab daemon under a prompt reaper.

A lab host's daemons (virtlogd, libvirtd) daemonize, and libvirtd daemonizes every QEMU it
starts, so their orphans go to the nearest *child subreaper* among their ancestors, else to
pid 1. On a real host pid 1 (systemd) reaps an orphan the moment it exits. This sandbox's pid 1
reaps orphans only every 1.5 s or so, and libvirt waits for a stopped QEMU to be reaped before it
goes on (``virProcessKillPainfully`` when a guest is destroyed, and so in a live migration's
Confirm step at the source): in the lab every guest stop took that long.

This process does for the lab what a host's init does: it detaches, becomes a child subreaper
(``prctl(PR_SET_CHILD_SUBREAPER)``), runs CMD, writes ``"<CMD's exit status> <own pid>"`` to the
file STATUS (atomically, so the caller can wait for it), then reaps every orphan that comes to
it and exits once it has no child left (after the lab is down).
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36
USAGE = "usage: python -m migsec.lab.reaper STATUS_FILE -- COMMAND [ARG...]"


def _write_status(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(USAGE, file=sys.stderr)
        return 2
    status, command = argv[0], argv[2:]
    if os.fork() != 0:
        return 0  # the caller's child ends at once; the reaper lives on, detached
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(f"reaper: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}", file=sys.stderr)
        _write_status(status, f"126 {os.getpid()}")
        os._exit(1)
    try:
        rc = subprocess.run(command, stdin=subprocess.DEVNULL, check=False).returncode
    except OSError as exc:
        print(f"reaper: cannot run {command[0]}: {exc}", file=sys.stderr)
        rc = 127
    _write_status(status, f"{rc} {os.getpid()}")
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break  # no child left: the daemon and everything it left behind are gone
        except InterruptedError:
            continue
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

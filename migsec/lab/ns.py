"""Namespaces, mounts and processes for the lab (thin wrappers over ip, mount and /proc)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from migsec.errors import LabError


def run(argv: list[str], timeout: float = 30) -> str:
    """Run a tool; a failure becomes LabError with its stderr."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} timed out") from exc
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def wait_for(check: Callable[[], Any], timeout: float, message: str) -> Any:
    """Poll ``check`` until it returns something true; LabError(message) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise LabError(message)
        time.sleep(0.2)


def ensure_netns(name: str) -> None:
    """Create the named network namespace unless it exists."""
    if not Path("/run/netns", name).exists():
        run(["ip", "netns", "add", name])


def link_exists(netns: str, link: str) -> bool:
    """Whether ``link`` exists in network namespace ``netns``."""
    return subprocess.run(["ip", "-n", netns, "link", "show", link], capture_output=True,
                          check=False).returncode == 0


def lab_netns(prefix: str) -> list[str]:
    """Network namespaces a lab with ``prefix`` may have made (found by name)."""
    pattern = re.compile(rf"{re.escape(prefix)}-([a-j]|sw)")
    try:
        return [n for n in os.listdir("/run/netns") if pattern.fullmatch(n)]
    except FileNotFoundError:
        return []


def mountpoints() -> set[str]:
    """Mount points of this process's mount namespace."""
    with open("/proc/self/mountinfo") as f:
        # Field 5 is the mount point; spaces etc. are octal-escaped.
        return {line.split()[4].encode().decode("unicode_escape") for line in f}


def is_mountpoint(path: Path) -> bool:
    return str(path) in mountpoints()


def private_mount(path: Path) -> None:
    # nsfs files can only be bind-mounted under a private mount (no propagation loops).
    path.mkdir(parents=True, exist_ok=True)
    if not is_mountpoint(path):
        run(["mount", "--bind", str(path), str(path)])
    run(["mount", "--make-private", str(path)])


def umount(path: Path) -> None:
    """Unmount ``path`` until nothing is mounted there."""
    while is_mountpoint(path):
        run(["umount", str(path)])


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or None if it is missing or not written yet."""
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks (None when gone or a zombie): pid + start time name a process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def alive(record: list | None) -> bool:
    """True if the recorded (pid, start time) still names the same, living process."""
    if not record:
        return False
    pid, started = record
    return started is not None and start_time(pid) == started


def ns_inode(path: Path) -> int | None:
    """Inode of a namespace file (/run/netns/X, /proc/PID/ns/net, a bind-mounted nsfs file)."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def proc_namespaces(pid: int) -> set[int]:
    """Inodes of the network and mount namespaces ``pid`` lives in."""
    found = set()
    for kind in ("net", "mnt"):
        ino = ns_inode(Path(f"/proc/{pid}/ns/{kind}"))
        if ino is not None:
            found.add(ino)
    return found


def terminate(pids: set[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` s; LabError if any survives."""
    pids.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for pid in list(pids):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # reap our own children (tests' popen)
                if start_time(pid) is None:
                    pids.discard(pid)
            if not pids:
                return
            time.sleep(0.1)
    if pids:
        raise LabError(f"processes {sorted(pids)} survived SIGKILL")

"""migsec.lab.reaper: a lab daemon's orphans are reaped by the reaper, not left to pid 1."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def _wait(predicate, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def _run(tmp_path: Path, script: str) -> tuple[int, int]:
    status = tmp_path / "started"
    subprocess.run([sys.executable, "-m", "migsec.lab.reaper", str(status), "--", "sh", "-c", script],
                   check=True, timeout=30)
    rc, reaper = _wait(lambda: status.read_text().split() if status.exists() else None)
    return int(rc), int(reaper)


def test_a_daemonized_child_is_adopted_and_reaped_at_once(tmp_path):
    # like `libvirtd -d`: the command exits, leaving a background process behind
    pid_file = tmp_path / "orphan.pid"
    rc, reaper = _run(tmp_path, f"sleep 30 & echo $! > {pid_file}; exit 0")
    assert rc == 0
    orphan = int(_wait(lambda: pid_file.read_text().strip() if pid_file.exists() else None))
    assert _ppid(orphan) == reaper  # adopted by the reaper, not by pid 1
    os.kill(orphan, 15)
    # reaped by the reaper (no zombie left), and the reaper ends with its last child
    _wait(lambda: _state(orphan) is None)
    _wait(lambda: _state(reaper) in (None, "Z"))


def test_the_commands_exit_status_is_reported(tmp_path):
    rc, _ = _run(tmp_path, "exit 3")
    assert rc == 3


def test_usage_error_without_separator(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "migsec.lab.reaper", str(tmp_path / "s"), "sh"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr

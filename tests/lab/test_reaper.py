"""migsec.lab.reaper: a lab daemon's orphans are reaped by the reaper, not left to pid 1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from migsec.lab.ns import wait_for


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of ``pid`` from /proc, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _ended(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent (pid 1 here) to reap it."""
    stat = _stat(pid)
    return stat is None or stat[0] == "Z"


def _run(tmp_path: Path, script: str) -> tuple[int, int]:
    status = tmp_path / "started"
    subprocess.run([sys.executable, "-m", "migsec.lab.reaper", str(status), "--", "sh", "-c", script],
                   check=True, timeout=30)
    rc, reaper = wait_for(lambda: status.read_text().split() if status.exists() else None, 10,
                          "the reaper wrote no status")
    return int(rc), int(reaper)


def test_a_daemonized_child_is_adopted_and_reaped_at_once(tmp_path):
    # like `libvirtd -d`: the command exits, leaving a background process behind
    pid_file = tmp_path / "orphan.pid"
    rc, reaper = _run(tmp_path, f"sleep 30 & echo $! > {pid_file}; exit 0")
    assert rc == 0
    orphan = int(wait_for(lambda: pid_file.read_text().strip() if pid_file.exists() else None, 10,
                          "the orphan's pid was not written"))
    orphan_stat = _stat(orphan)
    assert orphan_stat is not None and orphan_stat[1] == reaper  # adopted by the reaper, not by pid 1
    os.kill(orphan, 15)
    # reaped by the reaper (no zombie left), and the reaper ends with its last child
    wait_for(lambda: _stat(orphan) is None, 10, "the orphan was not reaped")
    wait_for(lambda: _ended(reaper), 10, "the reaper did not end")


def test_the_commands_exit_status_is_reported(tmp_path):
    rc, _ = _run(tmp_path, "exit 3")
    assert rc == 3


def test_usage_error_without_separator(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "migsec.lab.reaper", str(tmp_path / "s"), "sh"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr

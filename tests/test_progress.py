"""``migsec migrate --verbose``'s progress display (migsec/progress.py)."""
from __future__ import annotations

import io

from migsec.progress import Progress


def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    clock = iter([0.0, 1.0, 2.0, 3.0]).__next__
    p = Progress(out, clock=clock)
    p.update("disk", 512 * 1024, 1024 * 1024)
    p.update("disk", 1024 * 1024, 1024 * 1024)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("disk: 50% 512.0 KiB/1.0 MiB")
    assert lines[-1].startswith("disk: 100% 1.0 MiB/1.0 MiB")


def test_progress_line_has_no_percentage_while_the_total_is_unknown():
    out = io.StringIO()
    clock = iter([0.0, 1.0, 2.0, 3.0]).__next__
    p = Progress(out, clock=clock)
    p.update("memory", 3 * 2**20, 0)
    line = out.getvalue().splitlines()[0]
    assert line.startswith("memory: 3.0 MiB 3.0 MiB/s"), line
    assert "%" not in line and "ETA" not in line

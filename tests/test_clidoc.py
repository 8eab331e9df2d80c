"""The generated help pages (docs/commands.md, docs/migsec.1) cover every command and are current;
`migsecd --version` and `migsec --version` say the package version."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from migsec import __version__
from migsec.cli import COMMANDS
from migsec.clidoc import man, markdown, pages

DOCS = Path(__file__).resolve().parents[1] / "docs"
BIN = Path(sys.executable).parent
STALE = "stale: regenerate with `python -m migsec.clidoc markdown > docs/commands.md` and " \
        "`python -m migsec.clidoc man > docs/migsec.1`"


def test_every_command_and_subcommand_has_a_page():
    names = {name for name, _, _ in pages()}
    assert {f"migsec {c}" for c in COMMANDS} <= names
    assert {"migsec jobs abort", "migsec user passwd", "migsec user mod", "migsecd"} <= names
    for name, _, text in pages():
        assert text.startswith("Usage:") or text.startswith("usage:"), name


def test_committed_pages_are_current():
    assert (DOCS / "commands.md").read_text() == markdown(), STALE
    assert (DOCS / "migsec.1").read_text() == man(), STALE


def test_versions():
    for prog in ("migsecd", "migsec"):
        out = subprocess.run([BIN / prog, "--version"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and __version__ in out.stdout, (prog, out.stdout, out.stderr)

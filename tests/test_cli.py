"""The ``migsec`` group: lazy command table, ``--help`` without imports, ``python -m migsec``."""
from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from migsec import cli


def test_every_command_has_its_own_short_help_and_resolves():
    ctx = click.Context(cli.main)
    for name in cli.COMMANDS:
        assert cli.SHORT_HELP.get(name), f"{name} has no entry in SHORT_HELP"
        command = cli.main.get_command(ctx, name)
        assert command is not None, name
        assert cli.SHORT_HELP[name] == command.get_short_help_str(1000), f"SHORT_HELP[{name!r}] is stale"


def test_help_imports_no_command_module():
    code = (
        "import sys, json\n"
        "from migsec.cli import main\n"
        "try:\n"
        "    main(['--help'], standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "sys.stdout.flush()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('migsec'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    for target in cli.COMMANDS.values():
        module = target.split(":")[0]
        if module != "migsec.cli":
            assert module not in loaded, f"--help imported {module}"
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("args", [["--help"], ["ca", "--help"]])
def test_python_dash_m(args):
    done = subprocess.run([sys.executable, "-m", "migsec", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Usage: migsec" in done.stdout

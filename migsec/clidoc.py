"""The help pages of every command, generated from the commands themselves:
``python -m migsec.clidoc markdown > docs/commands.md`` and ``python -m migsec.clidoc man >
docs/migsec.1`` (tests/test_clidoc.py fails when the committed pages are stale)."""
from __future__ import annotations

import sys
from typing import Iterator

import click

from migsec import __version__
from migsec.cli import main
from migsec.daemon.main import build_parser

WIDTH = 80


def _walk(cmd: click.Command, ctx: click.Context) -> Iterator[tuple[str, str, str]]:
    """(full command name, one-line summary, --help text) of ``cmd`` and every subcommand."""
    yield ctx.command_path, cmd.get_short_help_str(limit=WIDTH), cmd.get_help(ctx).rstrip()
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            yield from _walk(sub, sub.make_context(name, [], parent=ctx, resilient_parsing=True,
                                                   terminal_width=WIDTH, max_content_width=WIDTH))


def pages() -> list[tuple[str, str, str]]:
    """Every page: ``migsec`` and its commands, then ``migsecd``."""
    root = main.make_context("migsec", [], resilient_parsing=True, terminal_width=WIDTH, max_content_width=WIDTH)
    out = list(_walk(main, root))
    parser = build_parser()
    out.append(("migsecd", parser.description or "", parser.format_help().rstrip()))
    return out


def markdown() -> str:
    lines = ["# Command reference", "",
             "Generated from the commands' own `--help` by `python -m migsec.clidoc markdown`; do not edit.",
             "", "| command | what it does |", "|---|---|"]
    items = pages()
    lines += [f"| [`{name}`](#{name.replace(' ', '-')}) | {summary.replace('|', '/')} |" for name, summary, _ in items]
    for name, _, text in items:
        lines += ["", f"## {name}", "", "```", text, "```"]
    return "\n".join(lines) + "\n"


def _roff(text: str) -> str:
    out = []
    for line in text.splitlines():
        line = line.replace("\\", "\\e")
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def man() -> str:
    items = pages()
    lines = [f'.TH MIGSEC 1 "" "migsec {__version__}" "migsec manual"', ".SH NAME",
             "migsec, migsecd \\- secure inter-cloud migration of libvirt/KVM virtual machines",
             ".SH SYNOPSIS", ".B migsec", "COMMAND [OPTIONS] [ARGS]", ".br", ".B migsecd", "[--config PATH]",
             ".SH COMMANDS"]
    for name, _, text in items:
        lines += [".SS " + name, ".nf", _roff(text), ".fi"]
    lines += [".SH SEE ALSO", "virsh(1), docs/operators.md"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    kind = sys.argv[1] if len(sys.argv) > 1 else "markdown"
    if kind not in ("markdown", "man"):
        sys.exit("usage: python -m migsec.clidoc markdown|man")
    sys.stdout.write(markdown() if kind == "markdown" else man())

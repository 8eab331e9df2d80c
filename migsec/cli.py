"""The ``migsec`` command: one click group.

Each package keeps its own commands next to its code (``migsec/<pkg>/cli.py``)
and they are loaded lazily, so ``migsec --help`` stays fast and a package that
fails to import only breaks its own commands. MigsecError becomes a clean
message and the error's exit code here, in one place.
"""
from __future__ import annotations

import importlib
import logging
import sys

import click

from migsec.errors import MigsecError

# command name -> "module:attribute" of a click command or group
COMMANDS: dict[str, str] = {
    "ca": "migsec.pki.cli:ca",
    "peer": "migsec.admin_cli:peer",
    "policy": "migsec.policy.cli:policy",
    "lab": "migsec.lab.cli:lab",
    "user": "migsec.admin_cli:user",
    "audit": "migsec.audit.cli:audit",
    "migrate": "migsec.client:migrate",
    "jobs": "migsec.client:jobs",
    "recover": "migsec.client:recover",
    "release": "migsec.client:release",
    "install": "migsec.ops:install",
    "doctor": "migsec.ops:doctor",
}

# command name -> its one-line help, so that ``migsec --help`` imports none of them
# (each the command's own short help; a command missing here is imported for it;
# tests/test_cli.py keeps them in step)
SHORT_HELP: dict[str, str] = {
    "ca": "Certificate authority for migsec domains (lab or federation).",
    "peer": "Manage the peer domains this host may migrate to and accept migrations from.",
    "policy": "XACML 3.0 policies: evaluate, check, write defaults.",
    "lab": "The one-machine lab: libvirt hosts in network + mount namespaces (needs root).",
    "user": "Manage the users of this domain's authentication server.",
    "audit": "Show and verify the audit ledger.",
    "migrate": "Migrate the running DOMAIN to migsec://HOST:PORT securely.",
    "jobs": "Show running and past migrations (from the migration journal); a running one with bytes, rate and ETA.",
    "recover": "After a crash: bring every interrupted migration's guest back running on exactly one host.",
    "release": "Let a kept DOMAIN start here again after migsec migrated it away.",
    "install": "Install the systemd unit, tmpfiles entry, libvirt hook, sample config and directories.",
    "doctor": "Check this host's migsec setup; one line per check, exit 1 on any FAIL.",
}


class MigsecGroup(click.Group):
    """A group whose commands live in other modules and whose errors are mapped once."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            short = SHORT_HELP.get(name)
            if short is None:
                cmd = self.get_command(ctx, name)
                if cmd is None or cmd.hidden:
                    continue
                short = cmd.get_short_help_str(formatter.width - 6 - len(name))
            rows.append((name, short))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None or cmd_name not in COMMANDS:
            return cmd
        module_name, attr = COMMANDS[cmd_name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if exc.name and module_name.startswith(exc.name):
                return None  # not built yet
            raise
        return getattr(module, attr, None)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MigsecError as exc:
            raise MigsecClickError(exc) from exc


class MigsecClickError(click.ClickException):
    def __init__(self, error: MigsecError) -> None:
        super().__init__(str(error) or type(error).__name__)
        self.exit_code = error.exit_code  # type: ignore[misc]  # click: a ClassVar; ours is per error

    def format_message(self) -> str:
        return self.message


@click.group(cls=MigsecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Log debugging detail to stderr.")
@click.version_option(package_name="migsec")
def main(debug: bool) -> None:
    """Secure inter-cloud migration of libvirt/KVM virtual machines."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


if __name__ == "__main__":  # pragma: no cover
    main()

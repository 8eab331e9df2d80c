"""``migsec install`` and ``migsec doctor``: thin click commands over migsec.ops."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from migsec.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, config_path
from migsec.errors import ConfigError
from migsec.ops.checks import FAIL, run_checks
from migsec.ops.layout import DEFAULT_CONFIG_DIR, Layout, apply, plan

_abs = click.Path(path_type=Path, file_okay=False)


@click.command()
@click.option("--prefix", type=_abs, default=None,
              help="Where migsec is installed (PREFIX/bin/migsecd). Default: this Python's prefix.")
@click.option("--config-dir", type=_abs, default=DEFAULT_CONFIG_DIR, show_default=True,
              help="Directory for migsecd.toml, keys and policies.")
@click.option("--root", type=_abs, default=Path("/"), show_default=True,
              help="Write everything below this directory (DESTDIR, for packaging and tests).")
@click.option("--source", type=_abs, default=None,
              help="A migsec checkout holding systemd/, hooks/ and examples/ (default: the copies this package carries, else its checkout).")
@click.option("--dry-run", is_flag=True, help="Say what would change; change nothing.")
def install(prefix: Path | None, config_dir: Path, root: Path, source: Path | None,
            dry_run: bool) -> None:
    """Install the systemd unit, tmpfiles entry, libvirt hook, sample config and directories.

    Idempotent: a second run changes nothing and says so. An existing migsecd.toml is never
    replaced.
    """
    prefix = (prefix or Path(sys.prefix)).absolute()
    layout = Layout(prefix=prefix, config_dir=config_dir.absolute(), root=root.absolute(),
                    source=source)
    migsecd = prefix / "bin" / "migsecd"
    if not migsecd.exists() and not layout.under_root(migsecd).exists():
        raise ConfigError(f"no migsecd in {prefix}/bin: install migsec into {prefix} first "
                          f"(python3 -m venv {prefix} && {prefix}/bin/pip install CHECKOUT)")
    report = apply(plan(layout), dry_run=dry_run)
    for line in report.lines(dry_run):
        click.echo(line)
    changed = {item.path for _, item in report.changed}
    if report.changed and not dry_run and layout.root == Path("/"):
        steps = ["systemctl daemon-reload", "systemd-tmpfiles --create migsec.conf"]
        if layout.hook in changed:
            steps.append("systemctl restart libvirtd   # libvirtd looks for hooks when it starts")
        steps.append("systemctl enable --now migsecd")
        click.echo("next:\n" + "\n".join(f"  {s}" for s in steps))


@click.command()
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help=f"migsecd.toml (default: ${CONFIG_ENV} or {DEFAULT_CONFIG_PATH}).")
@click.option("--hooks-dir", type=_abs, default=Path("/etc/libvirt/hooks"), show_default=True,
              help="libvirt's hook directory.")
@click.option("--unit", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("/etc/systemd/system/migsecd.service"), show_default=True,
              help="Where the migsecd unit should be installed.")
@click.option("--peer-timeout", type=click.FloatRange(min=0.1, max=30), default=2.0,
              show_default=True, help="Seconds to wait for each peer's TCP port.")
def doctor(config: Path | None, hooks_dir: Path, unit: Path, peer_timeout: float) -> None:
    """Check this host's migsec setup; one line per check, exit 1 on any FAIL."""
    # the host's own libvirtd, when the hooks checked are the host's own
    pid_file = Path("/run/libvirtd.pid") if hooks_dir == Path("/etc/libvirt/hooks") else None
    checks = run_checks(config_path(config), hooks_dir=hooks_dir, unit=unit,
                        peer_timeout=peer_timeout, libvirtd_pid_file=pid_file)
    for check in checks:
        click.echo(check.line())
    failed = [c for c in checks if c.status == FAIL]
    if failed:
        click.echo(f"{len(failed)} check(s) failed", err=True)
        sys.exit(1)

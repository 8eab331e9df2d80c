"""``migsec audit show`` and ``migsec audit verify``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from migsec.audit.ledger import SIGNER_KIND, Ledger
from migsec.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, config_path, load_config
from migsec.errors import ConfigError
from migsec.pki import TrustStore


@click.group()
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"migsecd configuration file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG_PATH}).")
@click.option("--ledger", "ledger_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="A ledger file to read instead of the configured one.")
@click.pass_context
def audit(ctx: click.Context, config: Path | None, ledger_path: Path | None) -> None:
    """Show and verify the audit ledger."""
    ctx.obj = {"config": config, "ledger": ledger_path}


def _ledger_path(ctx: click.Context) -> Path:
    if ctx.obj["ledger"] is not None:
        return ctx.obj["ledger"]
    return load_config(config_path(ctx.obj["config"]), check_files=False).paths.ledger


@audit.command("show")
@click.option("--migration", "migration_id", default=None, metavar="ID",
              help="Only the entries of this migration.")
@click.option("--json", "as_json", is_flag=True, help="One JSON entry per line, as stored.")
@click.pass_context
def show(ctx: click.Context, migration_id: str | None, as_json: bool) -> None:
    """List ledger entries (not verified: use `migsec audit verify`)."""
    path = _ledger_path(ctx)
    if not path.exists():
        raise ConfigError(f"{path}: no audit ledger (nothing was recorded yet)")
    for e in Ledger(path).entries(migration_id):
        if as_json:
            click.echo(json.dumps(e.as_dict(), sort_keys=True))
            continue
        if e.kind == SIGNER_KIND:
            summary = f"signer {e.body.get('did')}"
        else:
            summary = " ".join(f"{k}={_short(v)}" for k, v in sorted(e.body.items()))
            if e.peer is not None:
                summary += f" [signed by {e.peer.get('did') or 'peer'}]"
        click.echo(f"{e.seq:>6} {e.time} {e.kind:<22} {e.migration_id or '-':<20} {summary}")


@audit.command("verify")
@click.option("--trust", "trust_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="CA.pem",
              help="CA certificates to check against (default: [domain].trust of the config).")
@click.pass_context
def verify(ctx: click.Context, trust_files: tuple[Path, ...]) -> None:
    """Check the hash chain and every signature, the peers' included."""
    path = _ledger_path(ctx)
    if trust_files:
        store = TrustStore.from_files(trust_files)
    else:
        cfg = load_config(config_path(ctx.obj["config"]), check_files=False)
        store = TrustStore.from_files(cfg.domain.trust, cfg.domain.crls)
    if not path.exists():
        raise ConfigError(f"{path}: no audit ledger to verify")
    report = Ledger(path).verify(store)  # LedgerCorruptError names the first bad entry
    click.echo(f"{path}: OK, {report.entries} entries, {report.peer_messages} peer-signed "
               f"messages, signers {', '.join(sorted(set(report.signers))) or '-'}, "
               f"head {report.last_hash[:16]}")


def _short(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."

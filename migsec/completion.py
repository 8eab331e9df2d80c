"""Shell completion values for ``migsec`` (click's completion: ``_MIGSEC_COMPLETE=bash_source
migsec`` etc., see docs/operators.md): libvirt domain names, peer domains, running migrations.

Each function is a click ``shell_complete`` callback: it reads the configuration named by a
``--config`` already on the command line (else $MIGSEC_CONFIG or /etc/migsec/migsecd.toml) and
never raises, since a failing completion must not break the shell.
"""
from __future__ import annotations

from typing import Any

import click
from click.shell_completion import CompletionItem

from migsec.config import config_path, load_config
from migsec.daemon.wire import LocalConnection, socket_path
from migsec.pki import PeerDirectory


def _config(ctx: click.Context) -> Any:
    chosen = None
    node: click.Context | None = ctx
    while node is not None and chosen is None:
        chosen = node.params.get("config_path") or node.params.get("config")
        node = node.parent
    return load_config(config_path(chosen), check_files=False)


def _matching(values: list[tuple[str, str | None]], incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(v, help=h) for v, h in values if v.startswith(incomplete)]


def complete_domains(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Names of the libvirt domains on this host ([libvirt].uri)."""
    try:
        # lazy: libvirt is loaded for this completer only, and a failure to load it must not
        # break the shell (the except below)
        from migsec import virt

        with virt.connect(_config(ctx).libvirt.uri) as conn:
            names = conn.list_domains()
    except Exception:  # completion must never fail the shell
        return []
    return _matching([(n, None) for n in names], incomplete)


def _peers(ctx: click.Context) -> list[Any]:
    return PeerDirectory(_config(ctx).paths.peers).list()


def complete_destinations(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """``migsec://DID`` and the directory address of every peer domain."""
    try:
        peers = _peers(ctx)
    except Exception:
        return []
    values = [(f"migsec://{p.did}", p.address) for p in peers] + [(p.address, p.did) for p in peers]
    return _matching(values, incomplete)


def complete_peers(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Domain ids of the peer directory."""
    try:
        peers = _peers(ctx)
    except Exception:
        return []
    return _matching([(p.did, p.address) for p in peers], incomplete)


def complete_running(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Ids of the migrations migsecd is running."""
    try:
        chosen = ctx.params.get("config_path") or (ctx.obj or {}).get("config")
        with LocalConnection(socket_path(chosen), timeout=5) as conn:
            rows = conn.request({"op": "jobs"}).get("jobs", [])
    except Exception:
        return []
    return _matching([(r["migration_id"], f"{r.get('domain')} -> {r.get('peer')}") for r in rows
                      if r.get("running") and isinstance(r.get("migration_id"), str)], incomplete)

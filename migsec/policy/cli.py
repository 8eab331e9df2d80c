"""``migsec policy``: evaluate a request, check a policy directory, write the default policies."""
from __future__ import annotations

from pathlib import Path

import click

from migsec.errors import PolicyError, RequestSyntaxError
from migsec.policy.defaults import SHIPPED, render_default_policies
from migsec.policy.loader import load_policy_dir
from migsec.policy.pdp import PDP
from migsec.policy.request import parse_request

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group()
def policy() -> None:
    """XACML 3.0 policies: evaluate, check, write defaults."""


@policy.command("eval")
@click.option("--policy", "policies", type=_FILE, multiple=True, required=True,
              help="Policy file; the first is the root, the others are available to references.")
@click.option("--request", "request_file", type=_FILE, required=True, help="XACML request, XML or JSON.")
def eval_(policies: tuple[Path, ...], request_file: Path) -> None:
    """Print the XACML Response to a request (JSON when the request is JSON)."""
    pdp = PDP.from_files(list(policies))
    try:
        data = request_file.read_bytes()
    except OSError as exc:
        raise RequestSyntaxError(f"{request_file}: cannot read: {exc.strerror}") from exc
    response = pdp.evaluate(parse_request(data, str(request_file)))
    click.echo(response.serialize().decode().rstrip("\n"))


@policy.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def check(paths: tuple[Path, ...]) -> None:
    """Load a policy DIRECTORY as migsecd does ([paths].policy_dir: one set, or source/ +
    destination/; one root, every policy reachable from it) or FILES (the root first)."""
    if len(paths) == 1 and paths[0].is_dir():
        loaded = load_policy_dir(paths[0])
        stores = [("source/", loaded.source), ("destination/", loaded.destination)] if loaded.split \
            else [("", loaded.source)]
    elif all(p.is_file() for p in paths):
        stores = [("", PDP.from_files(list(paths)).store)]
    else:
        raise click.UsageError("give one directory, or policy files (the root first)")
    for where, store in stores:
        root = store.root
        click.echo(f"ok: {len(store.by_id)} policies loaded from "
                   f"{', '.join(str(p / where) if where else str(p) for p in paths)}; root "
                   f"{'PolicySet' if root.is_set else 'Policy'} {root.id} ({Path(root.source).name})")


@policy.command("init-defaults")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trusted", "trusted", multiple=True, required=True,
              help="Domain id VMs may be migrated to (repeat for several).")
@click.option("--accept-from", "accept_from", multiple=True,
              help="Domain id VMs are accepted from (repeatable; default: the --trusted list).")
@click.option("--max-vcpus", type=click.IntRange(min=1), default=SHIPPED["max_vcpus"], show_default=True)
@click.option("--max-memory-gib", type=click.IntRange(min=1), default=SHIPPED["max_memory_gib"], show_default=True)
@click.option("--bandwidth-mib-s", type=click.IntRange(min=1), default=SHIPPED["bandwidth_mib_s"], show_default=True,
              help="Bandwidth cap returned as an obligation to the destination.")
@click.option("--force", is_flag=True, help="Overwrite existing policy files.")
def init_defaults(directory: Path, trusted: tuple[str, ...], accept_from: tuple[str, ...], max_vcpus: int,
                  max_memory_gib: int, bandwidth_mib_s: int, force: bool) -> None:
    """Write the default source/destination policies into DIRECTORY."""
    existing = [p.name for p in (directory / n for n in ("root.xml", "source.xml", "destination.xml")) if p.exists()]
    if existing and not force:
        raise PolicyError(f"{directory}: {', '.join(existing)} already exist (use --force to overwrite)")
    paths = render_default_policies(list(trusted), max_vcpus, max_memory_gib, bandwidth_mib_s, directory,
                                    accept_from=list(accept_from) or None)
    PDP.from_directory(directory)  # what was written must load
    for p in paths:
        click.echo(f"wrote {p}")

"""``migsec user`` and ``migsec peer``: the administrator's commands for users and peer domains.

Both find their files through migsecd's configuration (``--config``, $MIGSEC_CONFIG or
/etc/migsec/migsecd.toml) and change them in place; a running migsecd re-reads them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from migsec.auth.sk3 import load_or_create_sk3
from migsec.auth.users import UserDatabase, check_password
from migsec.completion import complete_peers
from migsec.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, config_path, load_config
from migsec.errors import ConfigError, MigsecError
from migsec.pki import PeerDirectory

_config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help=f"migsecd configuration file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG_PATH}).")


def _config(ctx: click.Context, option: Path | None):
    # the subcommand's --config wins over the group's
    chosen = option or (ctx.obj or {}).get("config")
    return load_config(config_path(chosen), check_files=False)


# --- users ----------------------------------------------------------------------------------
@click.group()
@_config_option
@click.pass_context
def user(ctx: click.Context, config: Path | None) -> None:
    """Manage the users of this domain's authentication server."""
    ctx.obj = {"config": config}


def _users(ctx: click.Context, config: Path | None):
    return UserDatabase(_config(ctx, config).paths.users)


@user.command("add")
@click.argument("name")
@click.option("--role", "roles", multiple=True, metavar="ROLE",
              help="A role for the XACML policies (repeat for several).")
@click.option("--ssh-key", type=click.File("r"), default=None, metavar="FILE",
              help="OpenSSH public key (e.g. ~/.ssh/id_ed25519.pub): log in with ssh-agent.")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from the first line of standard input.")
@_config_option
@click.pass_context
def user_add(ctx: click.Context, name: str, roles: tuple[str, ...], ssh_key, password_stdin: bool,
             config: Path | None) -> None:
    """Add user NAME with a password (prompted twice) and/or an ssh public key."""
    cfg = _config(ctx, config)
    ssh_line = ssh_key.read() if ssh_key is not None else None
    password: str | None = None
    if password_stdin or ssh_line is None:
        password = _read_new_password(name, password_stdin, cfg.users.min_password_length,
                                      alternative=" or --ssh-key FILE")

    added = UserDatabase(cfg.paths.users).add(name, password, roles=roles, ssh_public_key=ssh_line,
                                               min_length=cfg.users.min_password_length)
    # the AS needs SK3 to issue tickets: make it now, so that the first start finds it
    load_or_create_sk3(cfg.paths.sk3)
    how = " and ".join(filter(None, ["password" if added.password else "",
                                     f"ssh key {added.ssh_fingerprint}" if added.ssh_public_key
                                     else ""]))
    click.echo(f"added user {added.name} (roles: {', '.join(added.roles) or 'none'}; "
               f"login: {how})")


def _read_new_password(name: str, password_stdin: bool, min_length: int, alternative: str = "") -> str:
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise click.UsageError("--password-stdin: standard input held no password")
        check_password(password, min_length)
        return password
    if not sys.stdin.isatty():
        raise click.UsageError(f"no terminal to prompt for a password: use --password-stdin{alternative}")
    while True:
        password = click.prompt(f"Password for {name} (at least {min_length} characters)", hide_input=True,
                                confirmation_prompt="Repeat the password")
        try:
            check_password(password, min_length)
            return password
        except MigsecError as exc:
            click.echo(str(exc), err=True)


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True,
              help="Read the new password from the first line of standard input.")
@_config_option
@click.pass_context
def user_passwd(ctx: click.Context, name: str, password_stdin: bool, config: Path | None) -> None:
    """Set a new password for user NAME (prompted twice; at least [users].min_password_length)."""
    cfg = _config(ctx, config)
    db = _users(ctx, config)
    db.get(name)  # no prompt for a user that does not exist
    password = _read_new_password(name, password_stdin, cfg.users.min_password_length)
    db.set_password(name, password, min_length=cfg.users.min_password_length)
    click.echo(f"changed the password of user {name}")


@user.command("mod")
@click.argument("name")
@click.option("--role", "roles", multiple=True, metavar="ROLE", help="Replace the roles with these (repeat).")
@click.option("--add-role", "add_roles", multiple=True, metavar="ROLE", help="Add a role (repeat).")
@click.option("--del-role", "del_roles", multiple=True, metavar="ROLE", help="Remove a role (repeat).")
@click.option("--no-roles", is_flag=True, help="Remove every role.")
@click.option("--ssh-key", type=click.File("r"), default=None, metavar="FILE",
              help="Replace (or add) the OpenSSH public key for ssh-agent logins.")
@click.option("--no-ssh-key", is_flag=True, help="Remove the ssh key (the user keeps the password).")
@click.option("--no-password", is_flag=True, help="Remove the password (the user keeps the ssh key).")
@_config_option
@click.pass_context
def user_mod(ctx: click.Context, name: str, roles: tuple[str, ...], add_roles: tuple[str, ...],
             del_roles: tuple[str, ...], no_roles: bool, ssh_key, no_ssh_key: bool, no_password: bool,
             config: Path | None) -> None:
    """Change user NAME's roles or login methods (the password: `migsec user passwd`)."""
    if roles and no_roles:
        raise click.UsageError("give --role or --no-roles, not both")
    if not (roles or add_roles or del_roles or no_roles or ssh_key or no_ssh_key or no_password):
        raise click.UsageError("nothing to change: give --role/--add-role/--del-role/--no-roles, "
                               "--ssh-key FILE/--no-ssh-key or --no-password")
    changed = _users(ctx, config).modify(
        name, roles=() if no_roles else (roles or None), add_roles=add_roles, remove_roles=del_roles,
        ssh_public_key=ssh_key.read() if ssh_key is not None else None, remove_ssh_key=no_ssh_key,
        remove_password=no_password)
    how = " and ".join(filter(None, ["password" if changed.password else "",
                                     f"ssh key {changed.ssh_fingerprint}" if changed.ssh_public_key else ""]))
    click.echo(f"changed user {changed.name} (roles: {', '.join(changed.roles) or 'none'}; login: {how})")


@user.command("del")
@click.argument("name")
@_config_option
@click.pass_context
def user_del(ctx: click.Context, name: str, config: Path | None) -> None:
    """Remove user NAME."""
    _users(ctx, config).delete(name)
    click.echo(f"deleted user {name}")


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_config_option
@click.pass_context
def user_list(ctx: click.Context, as_json: bool, config: Path | None) -> None:
    """List users, their roles and how they log in (never a secret)."""
    users = _users(ctx, config).list()
    rows = [{"name": u.name, "roles": list(u.roles), "password": u.password is not None,
             "ssh_key": u.ssh_fingerprint} for u in users]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no users")
        return
    width = max(4, *(len(r["name"]) for r in rows))
    click.echo(f"{'NAME':<{width}}  {'ROLES':<24}  LOGIN")
    for r in rows:
        login = ", ".join(filter(None, ["password" if r["password"] else "", r["ssh_key"] and
                                        f"ssh {r['ssh_key']}"]))
        click.echo(f"{r['name']:<{width}}  {','.join(r['roles']) or '-':<24}  {login}")


# --- peers ----------------------------------------------------------------------------------
@click.group()
@_config_option
@click.pass_context
def peer(ctx: click.Context, config: Path | None) -> None:
    """Manage the peer domains this host may migrate to and accept migrations from."""
    ctx.obj = {"config": config}


def _peers(ctx: click.Context, config: Path | None):
    return PeerDirectory(_config(ctx, config).paths.peers)


@peer.command("add")
@click.argument("did")
@click.option("--address", required=True, metavar="HOST:PORT", help="Where the peer's migsecd listens.")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              metavar="FILE", help="The peer domain's certificate (PEM).")
@click.option("--fingerprint", default=None, metavar="SHA256:...",
              help="Pin the certificate's SHA-256 fingerprint: the certificate is fetched and stored on "
                   "first contact (with --cert: checked against it).")
@click.option("--replace", is_flag=True, help="Replace an existing entry for DID (new address, certificate or pin).")
@_config_option
@click.pass_context
def peer_add(ctx: click.Context, did: str, address: str, cert: Path | None,
             fingerprint: str | None, replace: bool, config: Path | None) -> None:
    """Add peer domain DID at HOST:PORT, known by its certificate or a pinned fingerprint."""
    # DID, address and fingerprint syntax are checked by the peer directory itself
    if cert is None and fingerprint is None:
        raise click.UsageError("give --cert FILE or --fingerprint SHA256:... (or both)")
    cert_pem = None
    if cert is not None:
        try:
            cert_pem = cert.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--cert: cannot read {cert}: {exc.strerror}") from exc
    directory = _peers(ctx, config)
    existed = any(p.did == did for p in directory.list())
    added = directory.add(did, address, cert_pem=cert_pem, fingerprint=fingerprint, replace=replace)
    how = f"certificate {added.fingerprint}" if cert else f"pinned {added.fingerprint}"
    verb = "replaced" if existed else "added"
    click.echo(f"{verb} peer {added.did} at {added.address} ({how})")


@peer.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_config_option
@click.pass_context
def peer_list(ctx: click.Context, as_json: bool, config: Path | None) -> None:
    """List peer domains."""
    peers = _peers(ctx, config).list()
    rows = [{"did": p.did, "address": p.address,
             "certificate": p.cert_pem is not None, "fingerprint": p.fingerprint} for p in peers]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no peers")
        return
    width = max(3, *(len(r["did"]) for r in rows))
    click.echo(f"{'DID':<{width}}  {'ADDRESS':<24}  TRUST")
    for r in rows:
        trust = "certificate" if r["certificate"] else f"pinned {r['fingerprint']} (not yet seen)"
        click.echo(f"{r['did']:<{width}}  {r['address']:<24}  {trust}")


@peer.command("del")
@click.argument("did", shell_complete=complete_peers)
@_config_option
@click.pass_context
def peer_del(ctx: click.Context, did: str, config: Path | None) -> None:
    """Remove peer domain DID."""
    _peers(ctx, config).remove(did)
    click.echo(f"deleted peer {did}")

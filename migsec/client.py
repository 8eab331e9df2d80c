"""``migsec migrate``, ``migsec jobs``, ``migsec recover``: thin clients of the local migsecd.

They speak length-prefixed JSON over the daemon's unix socket
(``migsec.daemon.wire``). The local exchange with the authentication and
authorization servers is in ``migsec.auth.client_exchange``.
"""
from __future__ import annotations

import getpass
import json
import os
import signal
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import click

from migsec import completion
from migsec.auth import client_exchange
from migsec.config import config_path as resolve_config, load_config
from migsec.daemon import wire
from migsec.daemon.wire import LocalConnection, socket_path
from migsec.errors import (
    AuthenticationError,
    AuthorizationDenied,
    ConfigError,
    DaemonError,
    MigrationFailed,
    MigsecError,
)
from migsec.pki.peers import DEFAULT_PORT
from migsec.progress import Progress, human_bytes, human_seconds

_ERRORS: dict[str, type[MigsecError]] = {
    "AuthenticationError": AuthenticationError,
    "AuthorizationDenied": AuthorizationDenied,
    "MigrationFailed": MigrationFailed,
    "ConfigError": ConfigError,
}


def parse_destination(uri: str) -> tuple[str, int]:
    parts = urlsplit(uri)
    if parts.scheme != "migsec" or not parts.hostname:
        raise click.BadParameter(f"{uri!r}: expected migsec://HOST:PORT", param_hint="DESTINATION")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise click.BadParameter(f"{uri!r}: bad port", param_hint="DESTINATION") from exc
    return parts.hostname, port


def _read_password(password_stdin: bool, user: str) -> str:
    if password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise AuthenticationError("--password-stdin: no password on standard input")
        return line.rstrip("\n")
    if not sys.stdin.isatty():
        raise AuthenticationError("no terminal to prompt for a password: use --password-stdin or --ssh-agent")
    return getpass.getpass(f"Password for {user}: ")


@click.command()
@click.argument("domain", shell_complete=completion.complete_domains)
@click.argument("destination", shell_complete=completion.complete_destinations)
@click.option("--live/--cold", "live", default=False, show_default=True,
              help="Live: libvirt moves the running guest (pre-copy, disks mirrored over NBD) through migsec's "
                   "session; cold (the default, as virsh's): suspend, save, stream, restore at the destination.")
@click.option("--verbose", is_flag=True, help="Show progress (a bar with bytes, rate and ETA on a terminal).")
@click.option("--persistent", is_flag=True, help="Define the domain persistently on the destination.")
@click.option("--undefinesource", is_flag=True, help="Undefine the domain on the source after success.")
@click.option("--bandwidth", type=click.FloatRange(min=0.1), help="Limit the transfer rate (MiB/s).")
@click.option("--dry-run", is_flag=True, help="Authenticate, authorize on both sides, check capacity; move nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result.")
@click.option("--timeout", type=click.FloatRange(min=1), help="Give up (and roll back) after this many seconds.")
@click.option("--user", default=lambda: os.environ.get("MIGSEC_USER") or getpass.getuser(), show_default="$MIGSEC_USER or login name", help="migsec user to authenticate as.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="migsecd.toml (to find the daemon's socket).")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@click.option("--ssh-agent", "use_agent", is_flag=True, help="Prove identity with a key held by ssh-agent instead of a password.")
def migrate(domain, destination, live, verbose, persistent, undefinesource, bandwidth, dry_run, as_json,
            timeout, user, config_path, password_stdin, use_agent) -> None:
    """Migrate the running DOMAIN to migsec://HOST:PORT securely."""
    try:
        _migrate(domain, destination, live, verbose, persistent, undefinesource, bandwidth, dry_run, as_json,
                 timeout, user, config_path, password_stdin, use_agent)
    except MigsecError as exc:
        if not as_json:
            raise
        reply = exc.reply if isinstance(exc, DaemonError) else wire.error_reply(exc)
        click.echo(json.dumps({**reply, "ok": False}, sort_keys=True))
        sys.exit(exc.exit_code)


def _migrate(domain, destination, live, verbose, persistent, undefinesource, bandwidth, dry_run, as_json,
             timeout, user, config_path, password_stdin, use_agent) -> None:
    host, port = parse_destination(destination)
    credential: Any
    if use_agent:
        credential = client_exchange.AgentCredential.from_environment(user)
    else:
        credential = _read_password(password_stdin, user)
    conn = LocalConnection(socket_path(config_path))
    progress = Progress() if verbose and not as_json else None
    try:
        session = client_exchange.login(conn, user, credential)
        request = {
            "domain": domain,
            "mode": "live" if live else "cold",
            "destination": {"host": host, "port": port},
            "persistent": persistent,
            "undefine_source": undefinesource,
            "bandwidth_mib": bandwidth,
            "dry_run": dry_run,
            "timeout": timeout,
        }
        message = client_exchange.migration_message(session, request, conn)
        result: dict[str, Any] = {}
        say = progress.message if progress is not None else (lambda text: click.echo(text, err=True))
        interrupts = _Interrupts(conn.path, domain, say)
        try:
            with interrupts:
                for reply in conn.stream(message):
                    if reply.get("event") == "step" and isinstance(reply.get("migration_id"), str):
                        interrupts.started(reply["migration_id"])
                    if reply.get("event") == "progress" and progress is not None:
                        progress.update(reply.get("phase", ""), int(reply.get("done", 0)), int(reply.get("total", 0)))
                    elif reply.get("event") == "step" and progress is not None:
                        progress.message(str(reply.get("message", "")))
                    elif "event" not in reply:
                        result = reply.get("result", {})
        except _Detached:
            if progress is not None:
                progress.finish()
            what = interrupts.migration_id or domain
            click.echo(f"detached: migsecd goes on with migration {what} "
                       f"(`migsec jobs` shows how it ends)", err=True)
            if as_json:
                click.echo(json.dumps({"ok": False, "detached": True, "migration_id": interrupts.migration_id,
                                       "domain": domain}, sort_keys=True))
            sys.exit(130)
        except DaemonError:
            if progress is not None:
                progress.finish()
            raise
        if progress is not None:
            progress.finish()
    finally:
        conn.close()
    if as_json:
        click.echo(json.dumps({"ok": True, **result}, sort_keys=True))
        return
    if dry_run:
        click.echo(f"dry run: {domain} may migrate to {result.get('destination_did', host)} "
                   f"(authorized by both domains, capacity available); nothing was moved")
        return
    moved = result.get("bytes_on_wire")
    extra = f", {human_bytes(moved)} on the wire" if isinstance(moved, int) else ""
    job = result.get("job") or {}
    if isinstance(result.get("libvirt_downtime_ms"), int) and isinstance(result.get("paused_wait_ms"), (int, float)):
        # live: the guest's whole pause, libvirt's figure (up to B's Finish) + B's wait for the commit
        extra += (f", downtime {result['libvirt_downtime_ms'] + result['paused_wait_ms']:.0f} ms "
                  f"(libvirt {result['libvirt_downtime_ms']} ms + {result['paused_wait_ms']:.0f} ms paused at "
                  "the destination until the signed commit)")
    elif isinstance(job.get("downtime_ms"), int):
        extra += f", downtime {job['downtime_ms']} ms (libvirt's figure)"
    how = "live " if result.get("mode") == "live" else ""
    click.echo(f"migrated {domain} {how}to {result.get('destination_did', host)} "
               f"(migration {result.get('migration_id', '?')}, {result.get('seconds', 0):.1f} s{extra})")
    for disk in result.get("disks_not_removed") or []:
        click.echo(f"warning: source disk {disk.get('path')} was not removed: {disk.get('error')} "
                   "(remove it by hand)", err=True)


class _Detached(Exception):
    """A second SIGINT/SIGTERM: leave the migration (or its rollback) to migsecd."""


class _Interrupts:
    """SIGINT/SIGTERM while ``migsec migrate`` waits: the first asks migsecd to abort the
    migration (it rolls back as --timeout does; refused once the source decided commit), a
    second one detaches this client. Before the daemon named the migration, the abort goes
    by domain, and again once the id arrives if nothing was running yet."""

    def __init__(self, path: str, domain: str, say) -> None:
        self.path, self.domain, self.say = path, domain, say
        self.migration_id: str | None = None
        self.count = 0
        self._pending = False
        self._busy = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def started(self, migration_id: str) -> None:
        self.migration_id = migration_id
        if self._pending:
            self._pending = False
            if self._abort():
                self.say(f"aborting migration {migration_id} (it rolls back)")

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            if self._busy:
                return  # the first one is still asking migsecd: detach when it is done
            raise _Detached()
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        self._busy = True
        try:
            asked = self._abort()
        finally:
            self._busy = False
        if asked:  # said once migsecd has the request, so a second signal never cuts it off
            what = f"migration {self.migration_id}" if self.migration_id else f"the migration of {self.domain}"
            self.say(f"{name}: aborting {what} (it rolls back; {name} again detaches, the rollback goes on)")
        if self.count > 1:
            raise _Detached()

    def _abort(self) -> bool:
        """Ask migsecd to abort; False (and said why) when it refused."""
        request: dict[str, Any] = {"op": "abort", "by": "interrupt of migsec migrate"}
        request.update({"migration_id": self.migration_id} if self.migration_id else {"domain": self.domain})
        try:
            with LocalConnection(self.path, timeout=30) as conn:
                conn.request(request)
            return True
        except DaemonError as exc:
            if self.migration_id is None and "running" in str(exc):
                self._pending = True  # not started yet: abort as soon as the daemon names it
                return True
            self.say(f"cannot abort: {exc} (Ctrl-C again detaches this client)")
        except MigsecError as exc:
            self.say(f"cannot abort: {exc} (Ctrl-C again detaches this client)")
        return False


def _progress_text(progress: dict | None) -> str:
    if not progress:
        return ""
    done, total, rate = progress.get("done", 0), progress.get("total", 0), progress.get("rate", 0.0)
    amount = f"{human_bytes(done)}/{human_bytes(total)}" if total else human_bytes(done)
    eta = progress.get("eta")
    return (f"{progress.get('phase', '')} {amount} {human_bytes(rate)}/s"
            + (f" ETA {human_seconds(eta)}" if eta is not None else ""))


def _jobs_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["no migrations"]
    lines = [f"{'MIGRATION':<34} {'ROLE':<11} {'DOMAIN':<16} {'PEER':<22} {'PHASE':<16} UPDATED"]
    for row in rows:
        lines.append(f"{row.get('migration_id', ''):<34} {row.get('role', ''):<11} {row.get('domain', ''):<16} "
                     f"{row.get('peer', ''):<22} {row.get('phase', ''):<16} {row.get('updated', '')}")
        if row.get("progress"):
            lines.append(f"{'':<34} {_progress_text(row['progress'])}")
        for disk in row.get("disks_not_removed") or []:  # ops-a's --undefinesource report, when merged
            lines.append(f"  ! source disk {disk.get('path')} was not removed: {disk.get('error')} "
                         "(remove it by hand)")
    return lines


_config_opt = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                           help="migsecd.toml (to find the daemon's socket).")


@click.group(invoke_without_command=True)
@_config_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all", "show_all", is_flag=True, help="Include finished migrations older than a day.")
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until no migration runs.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=1.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.pass_context
def jobs(ctx, config_path, as_json, show_all, watch, interval) -> None:
    """Show running and past migrations (from the migration journal); a running one with
    bytes, rate and ETA."""
    ctx.ensure_object(dict)["config"] = config_path
    if ctx.invoked_subcommand is not None:
        return
    path = socket_path(config_path)
    tty = sys.stdout.isatty()
    while True:
        with LocalConnection(path) as conn:
            rows = conn.request({"op": "jobs", "all": show_all}).get("jobs", [])
        if as_json:
            click.echo(json.dumps(rows, sort_keys=True, indent=1))
        else:
            if watch and tty:
                click.echo("\x1b[H\x1b[2J", nl=False)  # clear the screen, as watch(1) does
            click.echo("\n".join(_jobs_table(rows)))
        if not watch or not any(r.get("running") for r in rows):
            return
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return


@jobs.command("abort")
@click.argument("migration_id", shell_complete=completion.complete_running)
@_config_opt
@click.option("--wait", type=click.FloatRange(min=0, max=3600), default=300, show_default=True,
              help="Seconds to wait for the rollback to finish (0: return at once).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def jobs_abort(ctx, migration_id, config_path, wait, as_json) -> None:
    """Abort the running migration MIGRATION_ID (or a unique prefix of it): it rolls back as
    --timeout does and the guest runs here again. Refused once this host decided commit."""
    path = socket_path(config_path or ctx.obj.get("config"))
    with LocalConnection(path) as conn:
        reply = conn.request({"op": "abort", "migration_id": migration_id, "wait": wait})
    if as_json:
        click.echo(json.dumps(reply, sort_keys=True))
        return
    mid, domain, phase = reply.get("migration_id"), reply.get("domain"), reply.get("phase")
    if reply.get("finished"):
        click.echo(f"aborted migration {mid}: {domain} {'runs here again' if phase == 'rolled-back' else phase} "
                   f"(phase {phase})")
    else:
        click.echo(f"abort of migration {mid} ({domain}) requested; it is rolling back "
                   f"(`migsec jobs` shows when it has)")


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="migsecd.toml (to find the daemon's socket).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def recover(config_path, as_json) -> None:
    """After a crash: bring every interrupted migration's guest back running on exactly one host."""
    with LocalConnection(socket_path(config_path)) as conn:  # no timeout: recovery may take a while
        reply = conn.request({"op": "recover"})
    actions = reply.get("actions", [])
    if as_json:
        click.echo(json.dumps(actions, sort_keys=True, indent=1))
        return
    if not actions:
        click.echo("nothing to recover")
    for action in actions:
        click.echo(f"{action.get('migration_id')}: {action.get('domain')}: {action.get('outcome')}")


@click.command()
@click.argument("domain")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="migsecd.toml (libvirt URI, ledger).")
def release(domain, config_path) -> None:
    """Let a kept DOMAIN start here again after migsec migrated it away.

    Only once it no longer runs at the destination: removes the mark the libvirt hook refuses
    to start, and records who did it in the audit ledger.
    """
    # lazy: only this command needs libvirt and the migration code; the others talk to migsecd
    from migsec.migration.release import release_domain

    config = load_config(resolve_config(config_path), check_files=False)
    operator = os.environ.get("SUDO_USER") or getpass.getuser()
    mark = release_domain(config, domain, operator=operator)
    click.echo(f"released {domain}: it may start here again (it was migrated to {mark.destination} "
               f"by migration {mark.migration_id} at {mark.at}; make sure it is not running there)")

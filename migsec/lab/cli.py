"""``migsec lab``: bring the one-machine lab up and down, look inside its hosts."""
from __future__ import annotations

import json
import os
import sys

import click

from migsec.lab.guest import DEFAULT_CACHE_DIR, build_guest
from migsec.lab.lab import DEFAULT_DIR, Lab


class LabContext:
    def __init__(self, dir: str, prefix: str | None) -> None:
        self.dir = dir
        self.prefix = prefix

    def lab(self) -> Lab:
        return Lab(self.dir, self.prefix)


pass_ctx = click.make_pass_decorator(LabContext)


@click.group()
@click.option("--dir", "dir_", envvar="MIGSEC_LAB_DIR", default=DEFAULT_DIR, show_default=True,
              help="State directory of the lab (env MIGSEC_LAB_DIR).")
@click.option("--prefix", envvar="MIGSEC_LAB_PREFIX", default=None,
              help="Name prefix of the lab's namespaces (default: recorded one, else 'migsec').")
@click.pass_context
def lab(ctx: click.Context, dir_: str, prefix: str | None) -> None:
    """The one-machine lab: libvirt hosts in network + mount namespaces (needs root)."""
    ctx.obj = LabContext(dir_, prefix)


@lab.command()
@click.option("--hosts", default=2, show_default=True, help="Number of hosts (a, b, c, ...).")
@click.option("--guest-memory", default="256M", show_default=True, help="Memory of the test guest.")
@click.option("--disk", default="1G", show_default=True, help="Disk size of the test guest.")
@click.option("--domain-type", type=click.Choice(["qemu", "kvm"]), default="qemu", show_default=True,
              help="qemu = TCG emulation (works everywhere), kvm = hardware virtualization.")
@click.option("--guest", default="vm1", show_default=True, help="Name of the test guest booted on host a.")
@click.option("--no-guest", is_flag=True, help="Bring the hosts up without booting a guest.")
@pass_ctx
def up(ctx: LabContext, hosts: int, guest_memory: str, disk: str, domain_type: str, guest: str,
       no_guest: bool) -> None:
    """Bring the lab up (idempotent) and boot the test guest on host a."""
    status = ctx.lab().up(hosts, domain_type=domain_type, guest=None if no_guest else guest,
                          guest_memory=guest_memory, disk=disk)
    _print_status(status)


@lab.command()
@pass_ctx
def down(ctx: LabContext) -> None:
    """Remove the lab: guests, daemons, namespaces and files (also after a crash)."""
    ctx.lab().down()
    click.echo(f"lab in {ctx.dir} removed")


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def status(ctx: LabContext, as_json: bool) -> None:
    """Show the hosts, their libvirt URIs, daemons and domains."""
    st = ctx.lab().status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
    else:
        _print_status(st)


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("host")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_ctx
def exec_(ctx: LabContext, host: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside HOST's network and mount namespaces: lab exec a -- ip addr."""
    argv = ctx.lab().host(host).nsenter(os.getcwd()) + list(command)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@lab.command()
@click.argument("host")
@click.argument("domain")
@click.option("--log", "show_log", is_flag=True, help="Print the console log file instead of attaching.")
@pass_ctx
def console(ctx: LabContext, host: str, domain: str, show_log: bool) -> None:
    """Attach to DOMAIN's serial console on HOST (Ctrl-] detaches)."""
    h = ctx.lab().host(host)
    if show_log:
        path = h.console_log(domain)
        if not path.exists():
            raise click.ClickException(f"no console log for {domain} on host {host} ({path})")
        click.echo(path.read_bytes().decode("utf-8", "replace"), nl=False)
        return
    argv = ["virsh", "-c", h.libvirt_uri, "console", domain]
    os.execvp(argv[0], argv)


@lab.command("build-guest")
@click.option("--cache", default=str(DEFAULT_CACHE_DIR), show_default=True,
              help="Cache directory (env MIGSEC_GUEST_CACHE).")
@click.option("--force", is_flag=True, help="Rebuild even if the cache holds this guest.")
def build_guest_cmd(cache: str, force: bool) -> None:
    """Build the test guest (kernel + busybox initramfs) into the cache and print its files."""
    image = build_guest(cache, force=force)
    click.echo(f"kernel {image.kernel}\ninitrd {image.initrd}\n"
               f"(kernel {image.kernel_version}, cache key {image.key})")


def _print_status(st: dict) -> None:
    if not st["up"]:
        click.echo(f"no lab in {st['dir']}")
        return
    click.echo(f"lab {st['prefix']} in {st['dir']} (domain type {st['domain_type']})")
    for name, h in st["hosts"].items():
        daemons = ", ".join(f"{d} {'up' if ok else 'DOWN'}" for d, ok in h["daemons"].items())
        click.echo(f"  host {name}  {h['address']}  netns {h['netns']}  {daemons}")
        click.echo(f"    libvirt  {h['uri']}")
        click.echo(f"    images   {h['image_dir']}")
        for dom, state in h["domains"].items():
            click.echo(f"    domain   {dom}: {state}")

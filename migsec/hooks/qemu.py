"""The libvirt ``qemu`` hook: ``main(argv) -> exit code`` (see ``migsec.hooks``).

Exit codes follow libvirt's hook contract: non-zero cancels the operation (it matters for
``migrate begin``, ``restore begin`` and the start phases; libvirt ignores it for
``stopped``/``release``). Security decisions fail closed: an unreadable configuration
refuses a native migration and a restore, never lets them through unmapped or unaudited.
Lifecycle records are appended after the fact; if the ledger cannot be written the hook
says so on stderr (libvirtd's log) but does not stop the VM for it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import IO, Any

from migsec.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, load_config
from migsec.errors import MigsecError
from migsec.handover import MOVED_NS, moved_mark
from migsec.hooks.mapping import map_restore_xml
from migsec.hooks.permit import PermitError, check_and_consume

PREFIX = "migsec hook"

# (operation, sub-operation) -> ledger entry kind for lifecycle records
LIFECYCLE = {
    ("started", "begin"): "vm-started",
    ("stopped", "end"): "vm-stopped",
    ("release", "end"): "vm-released",
}
MIGRATED_REASON = "migrated"  # the stop reason libvirt >= 10.5 passes after a migration out


@dataclass(frozen=True)
class HookCall:
    """One invocation: the four arguments libvirt passes (``-`` where absent)."""

    domain: str
    operation: str
    sub_operation: str
    extra: str = "-"

    @classmethod
    def from_argv(cls, argv: list[str]) -> "HookCall":
        if len(argv) not in (3, 4) or not all(argv):
            raise MigsecError(f"usage: 50-migsec DOMAIN OPERATION SUB-OPERATION [EXTRA] "
                              f"(libvirt passes four arguments; got {len(argv)})")
        return cls(*argv)


class HookRefused(MigsecError):
    """The hook refuses the operation (exit code 1, the message goes to libvirtd)."""


def main(argv: list[str] | None = None, *, stdin: IO[bytes] | None = None,
         stdout: IO[str] | None = None, stderr: IO[str] | None = None,
         environ: dict[str, str] | None = None) -> int:
    """Run the hook; returns the exit code libvirt acts on."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    env = os.environ if environ is None else environ
    try:
        call = HookCall.from_argv(sys.argv[1:] if argv is None else argv)
        out = dispatch(call, stdin, env.get(CONFIG_ENV) or str(DEFAULT_CONFIG_PATH), stderr)
    except MigsecError as exc:
        print(f"{PREFIX}: {exc}", file=stderr)
        return 1
    if out:
        stdout.write(out)
        stdout.flush()
    return 0


def dispatch(call: HookCall, stdin: IO[bytes], config_path: str, stderr: IO[str]) -> str | None:
    """Handle one call; returns what to print (a replacement XML) or None."""
    key = (call.operation, call.sub_operation)
    if key == ("migrate", "begin"):
        incoming_migration(call, stdin.read(), config_path, stderr)  # admits or raises HookRefused
        return None
    if key == ("restore", "begin"):
        return restore(call, stdin.read(), config_path)
    if key == ("start", "begin"):
        start(call, stdin.read(), config_path, stderr)
        return None
    if key in LIFECYCLE:
        lifecycle(call, stdin.read(), config_path, stderr)
    return None  # every other phase: nothing to do, nothing to say


def load(config_path: str) -> Any:
    # key files are checked when the ledger signs; syntax and maps are what the hook needs
    return load_config(config_path, check_files=False)


def incoming_migration(call: HookCall, xml: bytes, config_path: str, stderr: IO[str]) -> None:
    try:
        config = load(config_path)
    except MigsecError as exc:
        raise HookRefused(f"incoming libvirt migration of domain {call.domain!r} refused: "
                          f"cannot read the migsec configuration ({exc})") from exc
    fields = _domain_fields(call, xml)

    try:
        # migsec's own live migration: migsecd wrote a one-time permit for this uuid
        mid = check_and_consume(config.paths.state_dir / "permits", uuid=fields.get("uuid"), name=call.domain)
    except PermitError:
        pass  # not one of migsec's: a native migration, refused below unless allowed
    else:
        try:
            audit(config, "live-migration-admitted", migration_id=mid, **fields)
        except MigsecError as exc:
            print(f"{PREFIX}: warning: migsec live migration {mid} of {call.domain!r} admitted but not "
                  f"audited: {exc}", file=stderr)
        return None
    if config.hooks.allow_native_migration:
        try:
            audit(config, "native-migration-allowed", **fields)
        except MigsecError as exc:
            print(f"{PREFIX}: warning: native migration of {call.domain!r} let through "
                  f"([hooks] allow_native_migration) but not audited: {exc}", file=stderr)
        return None
    reason = (f"incoming libvirt migration of domain {call.domain!r} refused: on this host VMs "
              f"arrive only through migsec (use `migsec migrate`); set [hooks] "
              f"allow_native_migration = true in {config.path} to let libvirt's own migration in")
    try:
        audit(config, "native-migration-refused", **fields)
    except MigsecError as exc:
        raise HookRefused(f"{reason} (the refusal could not be audited: {exc})") from exc
    raise HookRefused(reason)


def restore(call: HookCall, xml: bytes, config_path: str) -> str | None:
    try:
        config = load(config_path)
    except MigsecError as exc:
        raise HookRefused(f"restore of domain {call.domain!r} refused: cannot read the migsec "
                          f"configuration to map its storage and networks ({exc})") from exc
    try:
        mapped = map_restore_xml(xml, storage_map=config.storage.map, network_map=config.network.map,
                                 bridge_map=config.network.bridge_map)
    except MigsecError as exc:
        raise HookRefused(f"restore of domain {call.domain!r} refused: {exc}") from exc
    if mapped is not None:
        # a save image made on another host, restored here outside migsec: it is let in
        # (mapped) only if the ledger records it, like a native migration
        try:
            audit(config, "foreign-restore", **_domain_fields(call, xml))
        except MigsecError as exc:
            raise HookRefused(f"restore of domain {call.domain!r} refused: it comes from another host "
                              f"and could not be audited ({exc})") from exc
    return mapped


def start(call: HookCall, xml: bytes, config_path: str, stderr: IO[str]) -> None:
    """Refuse to start a kept definition migsec marked as given away (``migsec.handover``)."""
    if MOVED_NS.encode() not in xml:
        return  # the common case stays cheap: no parse, no configuration
    try:
        mark = moved_mark(xml, error=HookRefused)
    except HookRefused as exc:
        raise HookRefused(f"start of domain {call.domain!r} refused: {exc}") from exc
    if mark is None:
        return
    reason = (f"start of domain {call.domain!r} refused: migsec migrated it to {mark.destination} "
              f"(migration {mark.migration_id}, {mark.at}) and it may be running there; starting "
              f"this kept definition would run it twice. If it no longer runs at {mark.destination}, "
              f"run `migsec release {call.domain}` on this host, then start it")
    try:
        audit(load(config_path), "start-refused-moved", migration=mark.migration_id,
              destination=mark.destination, **_domain_fields(call, xml))
    except MigsecError as exc:
        print(f"{PREFIX}: warning: refusal to start {call.domain!r} not audited: {exc}", file=stderr)
    raise HookRefused(reason)


def lifecycle(call: HookCall, xml: bytes, config_path: str, stderr: IO[str]) -> None:
    kind = LIFECYCLE[(call.operation, call.sub_operation)]
    if call.operation == "stopped" and call.extra == MIGRATED_REASON:
        # libvirt >= 10.5 says why a domain stopped; "migrated" is libvirt's own migration
        # out of this host. libvirt 9.0 passes "-": there it cannot be told from any other stop
        # and stays a vm-stopped (the destination's hook records the incoming side)
        kind = "native-migration-out"
    try:
        audit(load(config_path), kind, **_domain_fields(call, xml))
    except MigsecError as exc:
        print(f"{PREFIX}: warning: {kind} of domain {call.domain!r} not audited: {exc}",
              file=stderr)



def audit(config: Any, kind: str, **fields: Any) -> None:
    """Append one entry signed with the domain's key (several writers share the ledger)."""
    # lazy: these load cryptography, and libvirtd waits for the hook on every VM event, most of
    # which sign nothing
    from migsec.audit import Ledger
    from migsec.pki.identity import DomainIdentity

    identity = DomainIdentity.load(config.domain.key, config.domain.certificate)
    Ledger(config.paths.ledger, identity).append(kind, None, fields, source="libvirt-hook")


def _domain_fields(call: HookCall, xml: bytes) -> dict[str, Any]:
    fields: dict[str, Any] = {"domain": call.domain}
    if call.extra != "-":
        fields["reason"] = call.extra
    uuid = _uuid(xml)
    if uuid:
        fields["uuid"] = uuid
    return fields


def _uuid(xml: bytes) -> str | None:
    """The domain's uuid, found without a full parse (audit detail, not a decision input)."""
    start = xml.find(b"<uuid>")
    end = xml.find(b"</uuid>", start)
    if start < 0 or end < 0 or end - start > 64:
        return None
    text = xml[start + 6:end].strip().decode("ascii", "replace")
    return text if all(c in "0123456789abcdefABCDEF-" for c in text) else None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

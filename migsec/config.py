"""migsecd's TOML configuration: ``load_config(path) -> Config``.

The schema is documented in ``docs/config.md`` (example: ``examples/migsecd.toml``).
Every problem raises ``ConfigError`` naming the file and the setting, e.g.
``migsecd.toml: [domain].key: file /x is group-readable (must be 0600)``, so that
migsecd refuses to start with a message an operator can act on. Unknown tables
and keys are refused too: a typo must not silently leave a default in force.
Relative paths are taken relative to the directory of the configuration file.
"""
from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from migsec.errors import ConfigError, MigsecError

DEFAULT_CONFIG_PATH = Path("/etc/migsec/migsecd.toml")
CONFIG_ENV = "MIGSEC_CONFIG"
DEFAULT_CONTROL_SOCKET = "/run/migsec/migsecd.sock"

_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def config_path(option: str | os.PathLike[str] | None = None) -> Path:
    """The configuration file to use: ``--config`` if given, else $MIGSEC_CONFIG, else the default."""
    if option:
        return Path(option)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def did_problem(did: object) -> str | None:
    """Why ``did`` is not a valid domain id (a lower-case DNS-like name), or None if it is."""
    # one definition of a DID for all of migsec; lazy: pki loads cryptography, and importing
    # this module (the libvirt hook does, on every call) stays cheap
    from migsec.pki.names import validate_did

    try:
        validate_did(did)  # type: ignore[arg-type]
    except MigsecError as exc:
        return str(exc)
    return None


def parse_address(text: object, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into (host, port); ValueError says why not."""
    if not isinstance(text, str) or not text:
        raise ValueError("must be a non-empty string HOST:PORT")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from exc
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            raise ValueError(f"{text!r}: expected ':PORT' after ']'")
    else:
        if text.count(":") > 1:
            raise ValueError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
        host, sep, port_text = text.partition(":")
        port_text = port_text if sep else None
        if not _valid_host(host):
            raise ValueError(f"{text!r}: {host!r} is not a host name or IPv4 address")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: missing ':PORT'")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    if not host or len(host) > 253 or host.replace(".", "").isdigit():
        return False
    return all(_HOSTNAME_LABEL.match(label) for label in host.rstrip(".").split("."))


# --- the schema ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DomainConfig:
    id: str
    key: Path
    certificate: Path
    trust: tuple[Path, ...]
    crls: tuple[Path, ...] = ()


@dataclass(frozen=True)
class PathsConfig:
    state_dir: Path
    users: Path
    peers: Path
    policy_dir: Path
    sk3: Path

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / "journal"

    @property
    def ledger(self) -> Path:
        return self.state_dir / "ledger.jsonl"

    @property
    def staging_dir(self) -> Path:
        return self.state_dir / "staging"

    @property
    def source_policies(self) -> Path:
        return self.policy_dir / "source"

    @property
    def destination_policies(self) -> Path:
        return self.policy_dir / "destination"


@dataclass(frozen=True)
class ListenConfig:
    peer_host: str
    peer_port: int
    control_socket: Path
    socket_group: str | None
    socket_mode: int

    @property
    def peer(self) -> str:
        host = f"[{self.peer_host}]" if ":" in self.peer_host else self.peer_host
        return f"{host}:{self.peer_port}"


@dataclass(frozen=True)
class LibvirtConfig:
    uri: str = "qemu:///system"


@dataclass(frozen=True)
class StorageConfig:
    image_dir: Path
    map: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # directories whose files an incoming live guest may boot from (kernel, initrd, firmware),
    # besides the distribution's firmware directories
    boot_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class NetworkConfig:
    map: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    bridge_map: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class LimitsConfig:
    max_incoming: int = 2
    max_vcpus: int = 0  # 0 = no limit
    max_memory_mib: int = 0  # 0 = no limit
    bandwidth_mib_s: int = 0  # 0 = unlimited
    ticket_lifetime_s: int = 300
    clock_skew_s: int = 60


@dataclass(frozen=True)
class HooksConfig:
    allow_native_migration: bool = False


@dataclass(frozen=True)
class RecoveryConfig:
    auto: bool = True  # migsecd finishes at start what a crash interrupted


@dataclass(frozen=True)
class UsersConfig:
    min_password_length: int = 12  # for `migsec user add` / `passwd`; existing users keep theirs


@dataclass(frozen=True)
class Config:
    path: Path
    domain: DomainConfig
    paths: PathsConfig
    listen: ListenConfig
    libvirt: LibvirtConfig
    storage: StorageConfig
    network: NetworkConfig
    limits: LimitsConfig
    hooks: HooksConfig
    recovery: RecoveryConfig = RecoveryConfig()
    users: UsersConfig = field(default_factory=UsersConfig)


_SCHEMA: dict[str, set[str]] = {
    "domain": {"id", "key", "certificate", "trust", "crls"},
    "paths": {"state_dir", "users", "peers", "policy_dir", "sk3"},
    "listen": {"peer", "control_socket", "socket_group", "socket_mode"},
    "libvirt": {"uri"},
    "storage": {"image_dir", "map", "boot_dirs"},
    "network": {"map", "bridge_map"},
    "limits": {"max_incoming", "max_vcpus", "max_memory_mib", "bandwidth_mib_s",
               "ticket_lifetime_s", "clock_skew_s"},
    "hooks": {"allow_native_migration"},
    "recovery": {"auto"},
    "users": {"min_password_length"},
}


# --- loading ---------------------------------------------------------------------------------
def load_config(path: str | os.PathLike[str] | None = None, *, check_files: bool = True) -> Config:
    """Read and validate the configuration file.

    ``check_files=False`` checks syntax and types only; the admin CLI uses it so that users and
    peers can be managed before the domain's key and certificate exist.
    """
    path = config_path(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: configuration file not found (set --config or "
                          f"${CONFIG_ENV})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    return _Loader(path, raw, check_files).config()


class _Loader:
    def __init__(self, path: Path, raw: dict[str, Any], check_files: bool) -> None:
        self.path = path
        self.base = path.resolve().parent
        self.raw = raw
        self.check_files = check_files

    def fail(self, setting: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {setting}: {problem}")

    def table(self, name: str, required: bool = False) -> dict[str, Any]:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise self.fail(f"[{name}]", "missing table")
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"[{name}]", "must be a table")
        unknown = sorted(set(value) - _SCHEMA[name])
        if unknown:
            raise self.fail(f"[{name}].{unknown[0]}", "unknown setting "
                            f"(known: {', '.join(sorted(_SCHEMA[name]))})")
        return value

    # typed getters; each names the setting on error
    def get(self, tbl: str, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        value = self.raw.get(tbl, {}).get(key, default)
        if value is ...:
            raise self.fail(f"[{tbl}].{key}", "missing setting")
        # bool is an int in Python; a boolean where a number belongs is a mistake
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(f"[{tbl}].{key}", f"must be {_kind_name(kind)}, not a boolean")
        if value is not None and not isinstance(value, kind):
            raise self.fail(f"[{tbl}].{key}", f"must be {_kind_name(kind)}, "
                            f"not {type(value).__name__}")
        return value

    def path_value(self, tbl: str, key: str, default: Any = ...) -> Path:
        value = self.get(tbl, key, str, default)
        if not value:
            raise self.fail(f"[{tbl}].{key}", "must be a non-empty path")
        return self.base / Path(value).expanduser()

    def path_list(self, tbl: str, key: str, default: Any = ...) -> tuple[Path, ...]:
        value = self.get(tbl, key, list, default)
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.fail(f"[{tbl}].{key}[{i}]", "must be a non-empty path string")
            out.append(self.base / Path(item).expanduser())
        return tuple(out)

    def absolute_list(self, tbl: str, key: str) -> tuple[str, ...]:
        value = self.get(tbl, key, list, [])
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.startswith("/"):
                raise self.fail(f"[{tbl}].{key}[{i}]", "must be an absolute directory path")
        return tuple(value)

    def integer(self, tbl: str, key: str, default: int, *, minimum: int = 0,
                maximum: int | None = None) -> int:
        value = self.get(tbl, key, int, default)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise self.fail(f"[{tbl}].{key}", f"{value} is out of range (must be {bound})")
        return value

    def string_map(self, tbl: str, key: str, *, absolute: bool = False) -> Mapping[str, str]:
        value = self.get(tbl, key, dict, {})
        for k, v in value.items():
            if not isinstance(v, str) or not v:
                raise self.fail(f"[{tbl}].{key}.{k!r}", "must be a non-empty string")
            if absolute and not (k.startswith("/") and v.startswith("/")):
                raise self.fail(f"[{tbl}].{key}.{k!r}", "both directories must be absolute paths")
        return MappingProxyType(dict(value))

    # --- file checks
    def readable_file(self, setting: str, path: Path) -> None:
        if not self.check_files:
            return
        try:
            st = path.stat()
        except FileNotFoundError:
            raise self.fail(setting, f"file {path} does not exist") from None
        except OSError as exc:
            raise self.fail(setting, f"cannot access {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise self.fail(setting, f"{path} is not a regular file")
        if not os.access(path, os.R_OK):
            raise self.fail(setting, f"file {path} is not readable by this user")

    def secret_file(self, setting: str, path: Path, *, may_be_absent: bool = False) -> None:
        if may_be_absent and not path.exists():
            return
        self.readable_file(setting, path)
        if not self.check_files:
            return
        mode = path.stat().st_mode
        if mode & 0o070:
            raise self.fail(setting, f"file {path} is group-readable (must be 0600)")
        if mode & 0o007:
            raise self.fail(setting, f"file {path} is other-readable (must be 0600)")

    def directory(self, setting: str, path: Path) -> None:
        if self.check_files and not path.is_dir():
            raise self.fail(setting, f"directory {path} does not exist")

    # --- tables
    def config(self) -> Config:
        unknown = sorted(set(self.raw) - set(_SCHEMA))
        if unknown:
            raise self.fail(f"[{unknown[0]}]", f"unknown table (known: {', '.join(_SCHEMA)})")
        for name in _SCHEMA:
            self.table(name, required=name == "domain")
        return Config(
            path=self.path, domain=self.domain(), paths=self.paths(), listen=self.listen(),
            libvirt=self.libvirt(), storage=self.storage(), network=self.network(),
            limits=self.limits(), hooks=HooksConfig(
                allow_native_migration=self.get("hooks", "allow_native_migration", bool, False)),
            recovery=RecoveryConfig(auto=self.get("recovery", "auto", bool, True)),
            users=UsersConfig(min_password_length=self.integer(
                "users", "min_password_length", UsersConfig.min_password_length, minimum=1, maximum=1024)),
        )

    def domain(self) -> DomainConfig:
        did = self.get("domain", "id", str)
        problem = did_problem(did)
        if problem:
            raise self.fail("[domain].id", problem)
        key = self.path_value("domain", "key")
        self.secret_file("[domain].key", key)
        cert = self.path_value("domain", "certificate")
        self.readable_file("[domain].certificate", cert)
        trust = self.path_list("domain", "trust")
        if not trust:
            raise self.fail("[domain].trust", "needs at least one CA certificate file")
        for i, p in enumerate(trust):
            self.readable_file(f"[domain].trust[{i}]", p)
        crls = self.path_list("domain", "crls", [])
        for i, p in enumerate(crls):
            self.readable_file(f"[domain].crls[{i}]", p)
        return DomainConfig(id=did, key=key, certificate=cert, trust=trust, crls=crls)

    def paths(self) -> PathsConfig:
        state_dir = self.path_value("paths", "state_dir", "/var/lib/migsec")
        policy_dir = self.path_value("paths", "policy_dir", "/etc/migsec/policies")
        self.directory("[paths].policy_dir", policy_dir)
        sk3 = self.path_value("paths", "sk3", "/etc/migsec/sk3.key")
        self.secret_file("[paths].sk3", sk3, may_be_absent=True)
        users = self.path_value("paths", "users", "/etc/migsec/users.json")
        # the user database holds scrypt verifiers (the password-derived SK1): secret
        self.secret_file("[paths].users", users, may_be_absent=True)
        return PathsConfig(
            state_dir=state_dir, users=users,
            peers=self.path_value("paths", "peers", "/etc/migsec/peers.json"),
            policy_dir=policy_dir, sk3=sk3,
        )

    def listen(self) -> ListenConfig:
        from migsec.pki.peers import DEFAULT_PORT  # lazy: pki loads cryptography (see did_problem)

        peer = self.get("listen", "peer", str, f"0.0.0.0:{DEFAULT_PORT}")
        try:
            host, port = parse_address(peer)
        except ValueError as exc:
            raise self.fail("[listen].peer", str(exc)) from None
        mode = self.get("listen", "socket_mode", (int, str), 0o660)
        if isinstance(mode, str):
            try:
                mode = int(mode, 8)
            except ValueError:
                raise self.fail("[listen].socket_mode", f"{mode!r} is not an octal mode") from None
        if not 0 <= mode <= 0o777:
            raise self.fail("[listen].socket_mode", f"{mode:#o} is not a permission mode")
        if mode & 0o007:
            raise self.fail("[listen].socket_mode",
                            f"{mode:#o} gives other users access to the control socket")
        group = self.get("listen", "socket_group", str, None)
        if group == "":
            raise self.fail("[listen].socket_group", "must be a group name (or left out)")
        return ListenConfig(
            peer_host=host, peer_port=port,
            control_socket=self.path_value("listen", "control_socket", DEFAULT_CONTROL_SOCKET),
            socket_group=group, socket_mode=mode,
        )

    def libvirt(self) -> LibvirtConfig:
        uri = self.get("libvirt", "uri", str, "qemu:///system")
        if "://" not in uri:
            raise self.fail("[libvirt].uri", f"{uri!r} is not a libvirt URI (e.g. qemu:///system)")
        return LibvirtConfig(uri=uri)

    def storage(self) -> StorageConfig:
        default = str(self.path_value("paths", "state_dir", "/var/lib/migsec") / "images")
        return StorageConfig(
            image_dir=self.path_value("storage", "image_dir", default),
            map=self.string_map("storage", "map", absolute=True),
            boot_dirs=self.absolute_list("storage", "boot_dirs"),
        )

    def network(self) -> NetworkConfig:
        return NetworkConfig(map=self.string_map("network", "map"),
                             bridge_map=self.string_map("network", "bridge_map"))

    def limits(self) -> LimitsConfig:
        d = LimitsConfig()
        return LimitsConfig(
            max_incoming=self.integer("limits", "max_incoming", d.max_incoming, minimum=1),
            max_vcpus=self.integer("limits", "max_vcpus", d.max_vcpus),
            max_memory_mib=self.integer("limits", "max_memory_mib", d.max_memory_mib),
            bandwidth_mib_s=self.integer("limits", "bandwidth_mib_s", d.bandwidth_mib_s),
            ticket_lifetime_s=self.integer("limits", "ticket_lifetime_s", d.ticket_lifetime_s,
                                           minimum=1, maximum=86400),
            clock_skew_s=self.integer("limits", "clock_skew_s", d.clock_skew_s, maximum=3600),
        )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
             dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)

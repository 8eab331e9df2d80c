"""``migsec doctor``: check a host's migsec setup, one line per check, each with what to fix.

``run_checks(config_path, ...) -> [Check]``. A check is OK, WARN (works, but will bite:
a certificate expiring within 30 days, an unreachable peer, migsecd not running) or FAIL
(migsecd or a migration will not work until it is fixed).
"""
from __future__ import annotations

import datetime as dt
import functools
import os
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from migsec.config import DEFAULT_CONFIG_PATH, load_config
from migsec.errors import MigsecError, PolicyError
from migsec.ops.layout import HOOK_NAME
from migsec.pki import DomainIdentity, TrustStore
from migsec.pki.peers import DEFAULT_PORT, PeerDirectory
from migsec.policy.loader import load_policy_dir
from migsec.virt import connect

OK, WARN, FAIL = "OK", "WARN", "FAIL"
EXPIRY_WARNING = dt.timedelta(days=30)


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    message: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -- fix: {self.fix}" if self.fix and self.status != OK else ""
        return f"{self.status:<4} {self.name}: {self.message}{fix}"


def run_checks(config_path: Path, *, hooks_dir: Path = Path("/etc/libvirt/hooks"),
               unit: Path = Path("/etc/systemd/system/migsecd.service"),
               now: dt.datetime | None = None, peer_timeout: float = 2.0,
               libvirt: bool = True, libvirtd_pid_file: Path | None = None) -> list[Check]:
    """Every check, in the order an operator fixes things.

    ``libvirtd_pid_file``: the libvirtd that uses ``hooks_dir``; when given, a hook newer than
    that libvirtd's start warns (libvirtd looks for hooks only when it starts).
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        config = load_config(config_path, check_files=False)
    except MigsecError as exc:
        return [Check("config", FAIL, str(exc), f"edit {config_path} (see docs/config.md)")]
    checks = [Check("config", OK, f"{config.path} parses")]
    try:
        load_config(config_path, check_files=True)
    except MigsecError as exc:
        checks.append(Check("config files", FAIL, str(exc), "create or fix the file it names"))
    else:
        checks.append(Check("config files", OK, "every key, certificate and directory it names is usable"))
    checks += list(_key_permissions(config))
    checks += list(_certificate(config, now))
    checks.append(_policies(config))
    checks += list(_state(config))
    if libvirt:
        checks.append(_libvirt(config))
    checks += list(_hook(config, hooks_dir, libvirtd_pid_file))
    checks.append(_unit(unit))
    checks.append(_daemon(config))
    checks += list(_peers(config, peer_timeout, now))
    return checks


def _guard(name: str, fix: str, body: Callable[[], Check]) -> Check:
    try:
        return body()
    except MigsecError as exc:
        return Check(name, FAIL, str(exc), fix)
    except OSError as exc:
        return Check(name, FAIL, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), fix)


# --- the checks ------------------------------------------------------------------------------
def _key_permissions(config: Any) -> Iterator[Check]:
    secrets = [("domain key", config.domain.key, True), ("sk3", config.paths.sk3, False),
               ("user database", config.paths.users, False)]
    for what, path, required in secrets:
        name = f"permissions {what}"
        try:
            st = Path(path).stat()
        except FileNotFoundError:
            if required:
                yield Check(name, FAIL, f"{path} does not exist",
                            "issue the domain certificate: migsec ca issue --did DID --out DIR")
            else:
                yield Check(name, OK, f"{path} not created yet (made 0600 when first needed)")
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            yield Check(name, FAIL, f"{path} is mode {mode:04o}; secrets must be 0600",
                        f"chmod 600 {path}")
        elif st.st_uid != os.geteuid():
            yield Check(name, WARN, f"{path} is 0600 but owned by uid {st.st_uid}, not the user "
                        "running this check", f"chown it to the user migsecd runs as")
        else:
            yield Check(name, OK, f"{path} is {mode:04o}")


def _certificate(config: Any, now: dt.datetime) -> Iterator[Check]:
    fix = "issue a new one: migsec ca issue --did {did} --out DIR --force (then restart migsecd)"
    fix = fix.format(did=config.domain.id)
    try:
        identity = DomainIdentity.load(config.domain.key, config.domain.certificate)
        if identity.did != config.domain.id:
            yield Check("certificate", FAIL, f"{config.domain.certificate} is for domain "
                        f"{identity.did!r} but [domain].id is {config.domain.id!r}",
                        "use the certificate of this domain or correct [domain].id")
            return
        trust = TrustStore.from_files(config.domain.trust, config.domain.crls)
        verified = trust.verify(identity.cert_pem, expected_did=config.domain.id, at=now)
    except MigsecError as exc:
        yield Check("certificate", FAIL, str(exc), fix)
        return
    left = verified.not_after - now
    until = verified.not_after.strftime("%Y-%m-%d")
    if left < EXPIRY_WARNING:
        yield Check("certificate", WARN, f"{config.domain.id}: expires {until}, in {left.days} days",
                    fix)
    else:
        yield Check("certificate", OK, f"{config.domain.id}: valid until {until}, chains to "
                    "the trust store")


def _policies(config: Any) -> Check:
    def body() -> Check:
        policy_dir = config.paths.policy_dir
        try:
            loaded = load_policy_dir(policy_dir)  # the loader migsecd itself uses
        except PolicyError as exc:
            if "holds no *.xml" in str(exc) or "does not exist" in str(exc):
                return Check("policies", FAIL, str(exc), f"write policies: migsec policy init-defaults "
                             f"{policy_dir} --trusted PEER-DID")
            raise
        layout = "source/ + destination/" if loaded.split else "one set for both actions"
        roots = ", ".join(f"{s.root.id} ({Path(s.root.source).name})"
                          for s in ((loaded.source, loaded.destination) if loaded.split else (loaded.source,)))
        return Check("policies", OK, f"{loaded.count} policy file(s) load from {policy_dir} ({layout}; "
                     f"root {roots}; every policy reachable from it)")

    return _guard("policies", f"fix the policy named (migsec policy check {config.paths.policy_dir})", body)


def _state(config: Any) -> Iterator[Check]:
    state = Path(config.paths.state_dir)
    if not state.is_dir():
        yield Check("state directory", FAIL, f"{state} does not exist",
                    "run `migsec install` or `systemd-tmpfiles --create migsec.conf`")
        return
    mode = stat.S_IMODE(state.stat().st_mode)
    if mode & 0o077:
        yield Check("state directory", WARN, f"{state} is mode {mode:04o}: journal and staged VM "
                    "images are readable by others", f"chmod 700 {state}")
    elif not os.access(state, os.W_OK):
        yield Check("state directory", FAIL, f"{state} is not writable", "run migsecd as its owner")
    else:
        yield Check("state directory", OK, f"{state} ({mode:04o})")
    yield from _image_directories(config, state)


def _image_directories(config: Any, state: Path) -> Iterator[Check]:
    """Every directory an incoming disk can land in: it must exist and take a staged part file
    renamed into place there (incoming disks are staged beside their targets, so the rename
    never crosses file systems, whichever mount the images are on)."""
    image_dir = Path(config.storage.image_dir)
    dirs = {image_dir: f"[storage].image_dir {image_dir}"}
    for source, target in sorted(config.storage.map.items()):
        t = Path(target)
        t = t if t.is_dir() or not t.suffix else t.parent  # a file mapping lands in its directory
        dirs.setdefault(t, f"[storage].map target {t} (of {source})")
    for directory, what in dirs.items():
        name = "image directory" if directory == image_dir else f"image directory {directory}"
        if not directory.is_dir():
            yield Check(name, FAIL, f"{what} does not exist", f"mkdir -p {directory}")
            continue
        yield _guard(name, f"let migsecd's user write {directory}",
                     functools.partial(_stage_and_rename, name, directory, what, state))


def _stage_and_rename(name: str, directory: Path, what: str, state: Path) -> Check:
    import tempfile

    fd, part = tempfile.mkstemp(prefix=".migsec-doctor-", suffix=".part", dir=directory)
    try:
        os.write(fd, b"migsec doctor")
        os.fsync(fd)
        os.close(fd)
        final = part[:-len(".part")]
        os.replace(part, final)
        os.unlink(final)
    finally:
        if os.path.exists(part):
            os.unlink(part)
    where = ("another file system than" if directory.stat().st_dev != state.stat().st_dev
             else "the same file system as")
    return Check(name, OK, f"{what}: a staged disk can be written and renamed into place "
                 f"(on {where} {state}; disks are staged beside their targets)")


def _libvirt(config: Any) -> Check:
    def body() -> Check:
        with connect(config.libvirt.uri) as conn:
            count = len(conn.list_domains())
        return Check("libvirt", OK, f"{config.libvirt.uri} answers ({count} domain(s))")

    return _guard("libvirt", "start libvirtd (systemctl start libvirtd) or correct [libvirt].uri",
                  body)


def _hook(config: Any, hooks_dir: Path, pid_file: Path | None) -> Iterator[Check]:
    hook = hooks_dir / "qemu.d" / HOOK_NAME
    fix = "run `migsec install`, then restart libvirtd"
    if not hook.is_file():
        yield Check("libvirt hook", FAIL, f"{hook} is not installed: native migrations are not "
                    "refused and restores are not mapped", fix)
        return
    if not os.access(hook, os.X_OK):
        yield Check("libvirt hook", FAIL, f"{hook} is not executable (libvirt skips it)",
                    f"chmod 755 {hook}")
        return
    first = hook.read_bytes().split(b"\n", 1)[0].decode(errors="replace")
    interpreter = first[2:].strip().split()[0] if first.startswith("#!") and first[2:].strip() else ""
    if not interpreter or not os.access(interpreter, os.X_OK):
        yield Check("libvirt hook", FAIL, f"{hook} runs {interpreter or '(no #! line)'}, which is not "
                    "an executable", fix)
        return
    try:
        probe = subprocess.run([interpreter, "-c", "import migsec.hooks.qemu"], capture_output=True, text=True,
                               timeout=30, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        probe = subprocess.CompletedProcess([interpreter], 1, "", str(exc))
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["it failed"])[-1]
        yield Check("libvirt hook", FAIL, f"{hook} runs {interpreter}, which cannot import migsec ({last}): "
                    "every libvirt hook call fails", f"install migsec for {interpreter}, or run `migsec "
                    "install --prefix PREFIX` with the PREFIX migsec is installed in")
        return
    configured = _hook_config(hook)
    if Path(configured) != Path(config.path).absolute():
        yield Check("libvirt hook", WARN, f"{hook} reads {configured}, not {config.path}",
                    f"run `migsec install --config-dir {Path(config.path).parent}`")
        return
    started = _libvirtd_started(pid_file) if pid_file else None
    written = hook.stat().st_mtime
    # a process's start time is estimated from two clocks and file times are the file system's:
    # only a hook written clearly after libvirtd started is one it cannot have seen
    if started is not None and written - started > START_TIME_SLACK:
        yield Check("libvirt hook", WARN, f"{hook} is newer than the running libvirtd (written "
                    f"{written - started:.1f} s after it started), which looks for hooks only when "
                    "it starts", "systemctl restart libvirtd")
        return
    yield Check("libvirt hook", OK, f"{hook} installed and executable ({interpreter})")


def _hook_config(hook: Path) -> str:
    """The configuration the installed hook reads: its ``CONFIG = ...`` line, else the default."""
    import ast

    try:
        tree = ast.parse(hook.read_text(errors="replace"))
    except SyntaxError:
        tree = ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "CONFIG"
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    return str(DEFAULT_CONFIG_PATH)


START_TIME_SLACK = 2.0  # seconds


def _libvirtd_started(pid_file: Path) -> float | None:
    """When the libvirtd of ``pid_file`` started (epoch seconds), or None if it is not running."""
    try:
        pid = int(pid_file.read_text().split()[0])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, in clock ticks after boot
    except (OSError, ValueError, IndexError):
        return None
    # boot time from the clocks, not /proc/stat's btime: that is whole seconds, and a hook
    # installed in the second before libvirtd started would look newer than it
    booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return booted + ticks / os.sysconf("SC_CLK_TCK")


def _unit(unit: Path) -> Check:
    if unit.is_file():
        return Check("systemd unit", OK, f"{unit} installed")
    return Check("systemd unit", WARN, f"{unit} not installed: migsecd will not start at boot",
                 "run `migsec install`, then systemctl enable --now migsecd")


def _daemon(config: Any) -> Check:
    path = str(config.listen.control_socket)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(path)
    except OSError as exc:
        return Check("migsecd", WARN, f"control socket {path}: {exc.strerror or exc}",
                     "systemctl start migsecd; journalctl -u migsecd says why it stopped")
    return Check("migsecd", OK, f"answers on {path}")


def _peer_trust(config: Any, peer: Any, now: dt.datetime) -> Check | None:
    """A peer whose stored certificate does not verify against this domain's trust store
    (typically its CA is not in [domain].trust): every migration to it would be refused."""
    if peer.cert_pem is None:
        return None
    try:
        trust = TrustStore.from_files(config.domain.trust, config.domain.crls)
        trust.verify(peer.cert_pem, expected_did=peer.did, at=now)
    except MigsecError as exc:
        stores = ", ".join(str(p) for p in config.domain.trust)
        return Check(f"peer {peer.did}", FAIL, f"its certificate does not verify here: {exc}",
                     f"add the CA that issued it to [domain].trust ({stores}) and restart migsecd, or "
                     f"replace it: migsec peer add {peer.did} --address {peer.address} --cert FILE --replace")
    return None


def _peers(config: Any, timeout: float, now: dt.datetime | None = None) -> Iterator[Check]:
    try:
        peers = PeerDirectory(config.paths.peers).list()
    except MigsecError as exc:
        yield Check("peers", FAIL, str(exc), f"repair or remove {config.paths.peers}")
        return
    if not peers:
        yield Check("peers", WARN, f"no peer domains in {config.paths.peers}: nothing to migrate to",
                    f"migsec peer add DID --address HOST:{DEFAULT_PORT} --cert CERT (or --fingerprint SHA256:...)")
        return
    for peer in peers:
        untrusted = _peer_trust(config, peer, now or dt.datetime.now(dt.timezone.utc))
        if untrusted is not None:
            yield untrusted
            continue
        host, _, port = peer.address.removeprefix("migsec://").rpartition(":")
        host = host.strip("[]")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                pass
        except (OSError, ValueError) as exc:
            yield Check(f"peer {peer.did}", WARN, f"{peer.address} unreachable "
                        f"({getattr(exc, 'strerror', None) or exc}): migrations there will fail",
                        "check the peer's migsecd, routing and firewall (TCP port "
                        f"{port or DEFAULT_PORT})")
        else:
            yield Check(f"peer {peer.did}", OK, f"{peer.address} accepts TCP connections")

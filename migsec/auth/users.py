"""The authentication server's user database (``UserDatabase``).

One JSON file, mode 0600, replaced atomically on every change. A user has roles
(XACML subject attributes) and one or both credentials:

- a password, stored as scrypt parameters, a salt and the scrypt output (the
  "verifier key"), never the password. The verifier key is the paper's SK1: the AS
  encrypts its reply under it and the client derives the same key from the typed
  password, so the file is as secret as a key file;
- an OpenSSH public key, so that a signature made by ssh-agent (``paramiko.Agent``)
  proves the user's identity instead of a password.

Every call re-reads the file, so a running daemon sees ``migsec user`` changes at
once; changes are serialised across processes by ``flock`` on a ``.lock`` file.
"""
from __future__ import annotations

import base64
import binascii
import fcntl
import hmac
import json
import os
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import paramiko

from migsec.crypto.kdf import random_bytes, scrypt_key
from migsec.errors import AuthenticationError, ConfigError, MigsecError
from migsec.fsutil import atomic_write

FORMAT_VERSION = 1
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SALT_SIZE = 16
_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}$")
_ROLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,63}$")
# a module-level name: inside UserDatabase, ``list`` is its method
Roles = tuple[str, ...] | list[str]


class UserError(MigsecError):
    """A user does not exist, already exists, or a user entry is invalid."""

    exit_code = 2


@dataclass(frozen=True)
class PasswordVerifier:
    """scrypt parameters + salt + output: enough to check a password and to act as SK1."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def __repr__(self) -> str:  # the key is SK1: keep it out of logs and tracebacks
        return f"PasswordVerifier(n={self.n}, r={self.r}, p={self.p})"

    def matches(self, password: str | bytes) -> bool:
        derived = scrypt_key(password, self.salt, n=self.n, r=self.r, p=self.p,
                             length=len(self.key))
        return hmac.compare_digest(derived, self.key)


@dataclass(frozen=True)
class User:
    name: str
    roles: tuple[str, ...]
    password: PasswordVerifier | None = None
    ssh_public_key: str | None = None  # one OpenSSH line: "type base64 [comment]"

    @property
    def ssh_fingerprint(self) -> str | None:
        return _ssh_key(self.ssh_public_key).fingerprint if self.ssh_public_key else None


def parse_ssh_public_key(text: str) -> str:
    """Validate one OpenSSH public key line and return it normalised (``UserError`` if bad)."""
    line = text.strip()
    if not line or "\n" in line:
        raise UserError("ssh public key: expected exactly one line in OpenSSH format "
                        "('ssh-ed25519 AAAA... comment')")
    _ssh_key(line)
    return line


def _ssh_key(line: str) -> paramiko.PKey:
    try:
        blob = paramiko.pkey.PublicBlob.from_string(line)
        key = paramiko.PKey.from_type_string(blob.key_type, blob.key_blob)
        # paramiko reads short fields leniently; a key that does not re-encode to the same
        # blob was truncated or padded
        reencoded = key.asbytes()
    except Exception as exc:  # paramiko raises a mix of ValueError, SSHException, binascii.Error
        raise UserError(f"ssh public key is not a valid OpenSSH public key: {exc}") from exc
    if reencoded != blob.key_blob:
        raise UserError("ssh public key is not a valid OpenSSH public key: truncated or "
                        "trailing data in the key blob")
    return key


def check_password(password: str | bytes, min_length: int = 0) -> None:
    """Refuse an empty password, and one shorter than ``min_length`` characters."""
    if len(password) == 0:
        raise UserError("the password is empty")
    if len(password) < min_length:
        raise UserError(f"the password is too short: {len(password)} characters, at least {min_length} "
                        f"needed ([users].min_password_length)")


def _check_roles(roles: Roles) -> tuple[str, ...]:
    roles = tuple(roles)
    for role in roles:
        if not isinstance(role, str) or not _ROLE_NAME.match(role):
            raise UserError(f"role {role!r} is invalid (1-64 of A-Z a-z 0-9 . _ : -)")
    if len(set(roles)) != len(roles):
        raise UserError("a role is given twice")
    return roles


class UserDatabase:
    """Users of the authentication server, stored in ``path`` (JSON, 0600)."""

    def __init__(self, path: str | os.PathLike[str], *, scrypt_n: int = SCRYPT_N,
                 scrypt_r: int = SCRYPT_R, scrypt_p: int = SCRYPT_P) -> None:
        self.path = Path(path)
        self._params = (scrypt_n, scrypt_r, scrypt_p)

    # --- queries
    def list(self) -> list[User]:
        """All users, sorted by name."""
        return [self._decode(name, entry) for name, entry in sorted(self._read().items())]

    def get(self, name: str) -> User:
        """The user called ``name``; ``UserError`` if there is none."""
        entry = self._read().get(name)
        if entry is None:
            raise UserError(f"no user {name!r} in {self.path}")
        return self._decode(name, entry)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._read()

    def verify_password(self, name: str, password: str | bytes) -> User:
        """Return the user if ``password`` is theirs, else raise ``AuthenticationError``.

        The message is the same for an unknown user, a user without a password and a wrong
        password, so that a client cannot probe for names.
        """
        try:
            user = self.get(name)
        except UserError:
            user = None
        if user is None or user.password is None:
            # spend the same scrypt work as a real check, so timing does not reveal the name
            n, r, p = self._params
            scrypt_key(password or b"-", b"\0" * SALT_SIZE, n=n, r=r, p=p)
            raise AuthenticationError(f"authentication failed for user {name!r}")
        if not user.password.matches(password):
            raise AuthenticationError(f"authentication failed for user {name!r}")
        return user

    def verify_ssh_signature(self, name: str, data: bytes, signature_blob: bytes) -> User:
        """Check an SSH signature (wire format, as ``paramiko.AgentKey.sign_ssh_data`` returns)
        over ``data`` with the user's registered key; ``AuthenticationError`` if it fails."""
        try:
            user = self.get(name)
        except UserError:
            user = None
        ok = False
        if user is not None and user.ssh_public_key:
            try:
                ok = bool(_ssh_key(user.ssh_public_key).verify_ssh_sig(
                    data, paramiko.Message(bytes(signature_blob))))
            except Exception:  # a malformed blob is just a failed proof
                ok = False
        if not ok:
            raise AuthenticationError(f"ssh-agent authentication failed for user {name!r}")
        return user  # type: ignore[return-value]

    # --- changes
    def add(self, name: str, password: str | bytes | None = None, roles: Roles = (),
            ssh_public_key: str | None = None, *, min_length: int = 0) -> User:
        """Add a user with roles and a password and/or an OpenSSH public key. ``min_length``:
        the shortest password accepted (the CLI passes ``[users].min_password_length``)."""
        if not isinstance(name, str) or not _USER_NAME.match(name):
            raise UserError(f"user name {name!r} is invalid (1-64 of A-Z a-z 0-9 . _ @ -, "
                            "not starting with '.', '@' or '-')")
        roles = _check_roles(roles)
        if password is None and ssh_public_key is None:
            raise UserError(f"user {name!r} needs a password or an ssh public key to log in")
        entry: dict[str, Any] = {"roles": list(roles), "password": None, "ssh_public_key": None}
        if ssh_public_key is not None:
            entry["ssh_public_key"] = parse_ssh_public_key(ssh_public_key)
        if password is not None:
            entry["password"] = self._verifier(password, min_length)
        with self._locked():
            users = self._read()
            if name in users:
                raise UserError(f"user {name!r} already exists in {self.path}")
            users[name] = entry
            self._write(users)
        return self._decode(name, entry)

    def set_password(self, name: str, password: str | bytes, *, min_length: int = 0) -> User:
        """Replace user ``name``'s password (``migsec user passwd``)."""
        verifier = self._verifier(password, min_length)
        return self._change(name, lambda entry: entry.update(password=verifier))

    def modify(self, name: str, *, roles: Roles | None = None,
               add_roles: Roles = (), remove_roles: Roles = (),
               ssh_public_key: str | None = None, remove_ssh_key: bool = False,
               remove_password: bool = False) -> User:
        """Change a user's roles (replace, add, remove) and login methods (``migsec user mod``);
        a user always keeps at least one way to log in."""
        if ssh_public_key is not None and remove_ssh_key:
            raise UserError("give either a new ssh key or remove it, not both")
        key_line = parse_ssh_public_key(ssh_public_key) if ssh_public_key is not None else None
        new_roles = _check_roles(roles) if roles is not None else None
        added, removed = _check_roles(add_roles), _check_roles(remove_roles)

        def change(entry: dict[str, Any]) -> None:
            current = list(new_roles) if new_roles is not None else list(entry.get("roles", []))
            missing = [r for r in removed if r not in current]
            if missing:
                raise UserError(f"user {name!r} has no role {missing[0]!r}")
            current = [r for r in current if r not in removed] + [r for r in added if r not in current]
            entry["roles"] = current
            if key_line is not None:
                entry["ssh_public_key"] = key_line
            if remove_ssh_key:
                entry["ssh_public_key"] = None
            if remove_password:
                entry["password"] = None
            if entry.get("password") is None and entry.get("ssh_public_key") is None:
                raise UserError(f"user {name!r} would have no way to log in (keep a password or an ssh key)")

        return self._change(name, change)

    def _change(self, name: str, change: Callable[[dict[str, Any]], None]) -> User:
        with self._locked():
            users = self._read()
            if name not in users:
                raise UserError(f"no user {name!r} in {self.path}")
            entry = dict(users[name])
            change(entry)
            users[name] = entry
            self._write(users)
        return self._decode(name, entry)

    def _verifier(self, password: str | bytes, min_length: int) -> dict[str, Any]:
        check_password(password, min_length)
        n, r, p = self._params
        salt = random_bytes(SALT_SIZE)
        key = scrypt_key(password, salt, n=n, r=r, p=p)
        return {"kdf": "scrypt", "n": n, "r": r, "p": p, "salt": _b64(salt), "key": _b64(key)}

    def delete(self, name: str) -> None:
        """Remove a user; ``UserError`` if there is none."""
        with self._locked():
            users = self._read()
            if name not in users:
                raise UserError(f"no user {name!r} in {self.path}")
            del users[name]
            self._write(users)

    # --- the file
    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot lock the user database: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, Any]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the user database: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if mode & 0o077:
                raise ConfigError(f"{self.path}: user database is readable by group or others "
                                  f"(mode {stat.S_IMODE(mode):04o}, must be 0600)")
            data = fh.read()
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.path}: user database is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION \
                or not isinstance(doc.get("users"), dict):
            raise ConfigError(f"{self.path}: not a migsec user database (version {FORMAT_VERSION})")
        return doc["users"]

    def _write(self, users: dict[str, Any]) -> None:
        data = json.dumps({"version": FORMAT_VERSION, "users": users}, indent=2,
                          sort_keys=True).encode() + b"\n"
        try:
            atomic_write(self.path, data, mode=0o600, umask=False)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot write the user database: {exc.strerror}") from exc

    def _decode(self, name: str, entry: Any) -> User:
        where = f"{self.path}: user {name!r}"
        try:
            pw = entry.get("password")
            verifier = None
            if pw is not None:
                if pw.get("kdf") != "scrypt":
                    raise ConfigError(f"{where}: unknown password kdf {pw.get('kdf')!r}")
                verifier = PasswordVerifier(n=int(pw["n"]), r=int(pw["r"]), p=int(pw["p"]),
                                            salt=_unb64(pw["salt"]), key=_unb64(pw["key"]))
            roles = entry.get("roles", [])
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise ConfigError(f"{where}: roles must be a list of strings")
            return User(name=name, roles=tuple(roles), password=verifier,
                        ssh_public_key=entry.get("ssh_public_key"))
        except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ConfigError(f"{where}: malformed entry ({exc!r})") from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)

"""SK3: the key a domain's authentication and authorization servers share (paper step 2).

The AS seals each Auth_Tkt under it and the AZ opens it; it never leaves the host. The file
is 32 random bytes, 0600, created on first use.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from migsec.crypto import random_bytes
from migsec.errors import ConfigError


def load_or_create_sk3(path: Path) -> bytes:
    """SK3, the key the AS and AZ share (0600). Created on first start if absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = random_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ConfigError(f"[paths].sk3: cannot create {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        return key
    if st.st_mode & 0o077:
        raise ConfigError(f"[paths].sk3: {path} is group/other-accessible (must be 0600)")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"[paths].sk3: {path} is not a regular file")
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"[paths].sk3: cannot read {path}: {exc.strerror}") from exc
    if len(key) != 32:
        raise ConfigError(f"[paths].sk3: {path} must hold exactly 32 bytes")
    return key

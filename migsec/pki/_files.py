"""Small file helpers shared by the pki modules."""
from __future__ import annotations

import os
from pathlib import Path

from migsec.errors import ConfigError
from migsec.fsutil import atomic_write


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temp file + rename, so readers never see half a file."""
    try:
        atomic_write(path, data, mode=mode)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc


def read_bytes(path: str | os.PathLike[str], what: str, limit: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes")
    return data

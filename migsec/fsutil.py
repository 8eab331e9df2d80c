"""Durable file replacement, shared by every package that keeps state in files.

Readers must never see half a file and a crash must leave either the old or the new
content: write a temp file beside the target, fsync it, rename it over the target
(or link it, to refuse replacing one), then fsync the directory so the rename itself
survives a power cut. Errors are plain ``OSError``: each caller names its own file
and raises its own MigsecError.
"""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory entries of ``path`` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644,
                 umask: bool = True, overwrite: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    ``mode`` is filtered by the process umask like ``open()``, unless ``umask=False``
    (then the file gets exactly ``mode``). With ``overwrite=False`` an existing
    ``path`` is never replaced: ``FileExistsError``, even if it appeared meanwhile.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # O_NOFOLLOW: a symlink planted at the temp name is not written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
        try:
            if not umask:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # unlike rename, fails when the target exists
            os.unlink(tmp)
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

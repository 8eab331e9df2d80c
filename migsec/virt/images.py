"""Disk images through qemu-img: inspecting a backing chain, re-pointing a backing file.

Formats are always given, never probed: a guest can write a qcow2 header into a
raw disk, and a probed "backing file" would then be any file on the host.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from migsec.virt.errors import DiskImageError

QEMU_IMG = "qemu-img"
_TIMEOUT = 60
_FORMATS = {"raw", "qcow2", "qed", "vmdk", "vdi", "vpc", "vhdx", "luks"}


@dataclass(frozen=True)
class ImageInfo:
    """One image of a chain as qemu-img sees it."""

    path: str
    format: str
    virtual_size: int | None
    allocated_size: int | None
    backing: str | None


def _run(argv: list[str], what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskImageError(f"{what}: cannot run {QEMU_IMG}: {exc}") from exc
    if proc.returncode != 0:
        raise DiskImageError(f"{what}: {QEMU_IMG} failed: {proc.stderr.strip()}")
    return proc.stdout


def _check_format(fmt: str, what: str) -> str:
    if fmt not in _FORMATS:
        raise DiskImageError(f"{what}: unknown image format {fmt!r} (expected one of {sorted(_FORMATS)})")
    return fmt


def _size(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def image_chain(path: str, *, format: str) -> tuple[ImageInfo, ...]:
    """``path`` and every image below it, top first (``qemu-img info --backing-chain``)."""
    what = f"inspect image '{path}'"
    argv = [QEMU_IMG, "info", "--backing-chain", "--output=json", "-U", "-f", _check_format(format, what), path]
    out = _run(argv, what)
    try:
        data = json.loads(out)
    except json.JSONDecodeError as exc:
        raise DiskImageError(f"{what}: {QEMU_IMG} gave unreadable output") from exc
    if isinstance(data, dict):  # a single image without --backing-chain support
        data = [data]
    if not isinstance(data, list) or not data or not all(isinstance(e, dict) for e in data):
        raise DiskImageError(f"{what}: {QEMU_IMG} gave unexpected JSON")
    return tuple(
        ImageInfo(
            path=str(e.get("filename", "")),
            format=str(e.get("format", "")),
            virtual_size=_size(e.get("virtual-size")),
            allocated_size=_size(e.get("actual-size")),
            backing=e.get("full-backing-filename") or e.get("backing-filename"),
        )
        for e in data
    )


def rebase_image(path: str, *, backing: str, backing_format: str, format: str = "qcow2") -> None:
    """Point ``path``'s header at ``backing`` without touching data (``qemu-img rebase -u``).

    For images moved with their chain to another directory: the content is
    unchanged, only the recorded backing path is.
    """
    what = f"rebase image '{path}' onto '{backing}'"
    if not backing.startswith("/"):
        raise DiskImageError(f"{what}: the backing path must be absolute")
    _run(
        [QEMU_IMG, "rebase", "-u", "-f", _check_format(format, what), "-b", backing,
         "-F", _check_format(backing_format, what), path],
        what,
    )

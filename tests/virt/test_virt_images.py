"""image_chain and rebase_image on real qemu-img images."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from migsec.virt import DiskImageError, image_chain, rebase_image


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_chain_and_rebase(tmp_path: Path) -> None:
    base, top, moved = tmp_path / "base.raw", tmp_path / "top.qcow2", tmp_path / "moved-base.raw"
    qemu_img("create", "-f", "raw", str(base), "8M")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    chain = image_chain(str(top), format="qcow2")
    assert [(i.path, i.format, i.backing) for i in chain] == [
        (str(top), "qcow2", str(base)),
        (str(base), "raw", None),
    ]
    assert chain[0].virtual_size == 8 * 1024 * 1024
    base.rename(moved)
    with pytest.raises(DiskImageError, match=str(base)):
        image_chain(str(top), format="qcow2")
    rebase_image(str(top), backing=str(moved), backing_format="raw")
    assert [i.path for i in image_chain(str(top), format="qcow2")] == [str(top), str(moved)]


def test_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(DiskImageError, match="missing.qcow2"):
        image_chain(str(tmp_path / "missing.qcow2"), format="qcow2")
    with pytest.raises(DiskImageError, match="unknown image format 'qcow3'"):
        image_chain(str(tmp_path / "x"), format="qcow3")
    with pytest.raises(DiskImageError, match="absolute"):
        rebase_image(str(tmp_path / "x"), backing="base.raw", backing_format="raw")

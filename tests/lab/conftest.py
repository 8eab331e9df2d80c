"""Fixtures for the lab tests: one lab per session, always torn down."""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

from migsec.lab import Lab
from migsec.lab.guest import kernel_versions
from migsec.lab.lab import REQUIRED_TOOLS


def lab_unavailable() -> str | None:
    """Why the real lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, mounts, libvirtd)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools for the lab: {', '.join(missing)} (run scripts/setup.sh)"
    if not kernel_versions():
        return "no linux-image-*-cloud-amd64 kernel for the test guest (run scripts/setup.sh)"
    if not Path("/bin/busybox").is_file():
        return "busybox-static is not installed (run scripts/setup.sh)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = lab_unavailable()
    if reason is None:
        return
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def _new_lab(tmp_path_factory, name: str) -> Lab:
    # A short, unique prefix so a test lab never meets a developer's lab (prefix "migsec").
    prefix = "t" + secrets.token_hex(3)
    return Lab(tmp_path_factory.mktemp(name), prefix)


@pytest.fixture(scope="session")
def new_lab(tmp_path_factory):
    """A function making a Lab (not up) under a fresh temporary dir with a unique prefix."""
    return lambda name: _new_lab(tmp_path_factory, name)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """Two hosts up, the 256 MiB test guest vm1 booted on host a."""
    the_lab = _new_lab(tmp_path_factory, "lab")
    try:
        the_lab.up(2, guest="vm1", guest_memory="256M", disk="1G")
        yield the_lab
    finally:
        the_lab.down()

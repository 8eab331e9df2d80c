"""Fixtures for the lab tests: one lab per session, always torn down."""
from __future__ import annotations

import secrets

import pytest

from migsec.lab import Lab


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

"""Fixtures for the config and admin CLI tests: a site whose files a minimal migsecd.toml names."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from site_layout import domain_and_paths


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory with the files a valid migsecd.toml points at (relative paths)."""
    write(tmp_path / "pki/domain-key.pem", "key", 0o600)
    write(tmp_path / "pki/domain-cert.pem", "cert")
    write(tmp_path / "pki/ca-cert.pem", "ca")
    (tmp_path / "policies/source").mkdir(parents=True)
    (tmp_path / "policies/destination").mkdir(parents=True)
    return tmp_path


@pytest.fixture
def write_file():
    return write


@pytest.fixture
def minimal() -> str:
    """A valid migsecd.toml for ``site``."""
    return MINIMAL


MINIMAL = domain_and_paths("cloud-a.example")


@pytest.fixture
def p(tmp_path):
    """Two in-process domains (tests/daemon/orchestration.py): A's Services and B's endpoint."""
    from orchestration import pair

    pr = pair(tmp_path)
    yield pr
    pr.close()

"""Shared pytest fixtures for migsec."""
import os
from pathlib import Path

import pytest

from site_layout import domain_and_paths


def pytest_collection_modifyitems(config, items):
    """Tests marked ``lab`` skip, saying why, where the two-host lab cannot run."""
    lab_items = [item for item in items if "lab" in item.keywords]
    if not lab_items:
        return
    from migsec.lab.lab import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        for item in lab_items:
            item.add_marker(pytest.mark.skip(reason=reason))


# the config and admin CLI tests (tests/test_config.py, tests/test_admin_cli.py): a site whose
# files a minimal migsecd.toml names

def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory with the files a valid migsecd.toml points at (relative paths)."""
    _write(tmp_path / "pki/domain-key.pem", "key", 0o600)
    _write(tmp_path / "pki/domain-cert.pem", "cert")
    _write(tmp_path / "pki/ca-cert.pem", "ca")
    (tmp_path / "policies/source").mkdir(parents=True)
    (tmp_path / "policies/destination").mkdir(parents=True)
    return tmp_path


@pytest.fixture
def write_file():
    return _write


@pytest.fixture
def minimal() -> str:
    """A valid migsecd.toml for ``site``."""
    return domain_and_paths("cloud-a.example")

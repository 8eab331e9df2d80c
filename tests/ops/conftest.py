"""A host's migsec setup in a temporary directory: real CA, domain certificate, config, policies
(``site_layout.make_site``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from site_layout import Site, make_site

__all__ = ["REPO", "Site", "make_site", "mode"]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def site(tmp_path) -> Site:
    return make_site(tmp_path / "site")


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777

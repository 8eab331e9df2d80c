"""Fixtures for the hook tests: one host's migsec files (``site_layout.make_site``)."""
from __future__ import annotations

import pytest

from site_layout import Site, make_site


@pytest.fixture
def site(tmp_path) -> Site:
    return make_site(tmp_path / "site")

"""Fixtures for the orchestrator and recovery tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def p(tmp_path):
    """Two in-process domains (tests/migration/orchestration.py): A's Services and B's endpoint."""
    from orchestration import pair

    pr = pair(tmp_path)
    yield pr
    pr.close()

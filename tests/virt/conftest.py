"""Fixtures for migsec.virt tests: libvirt's in-process test driver."""
from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from migsec.virt import Connection, connect
from virt_helpers import TEST_URI


@pytest.fixture
def conn() -> Iterator[Connection]:
    # test:///default keeps its state while a connection is open and resets when the
    # last one closes, so each test starts from the stock single "test" domain.
    # A failed test's traceback can keep libvirt domain objects (and so the old state) alive.
    gc.collect()
    c = connect(TEST_URI)
    assert c.list_domains() == ["test"], "test driver state leaked from another connection"
    yield c
    c.close()

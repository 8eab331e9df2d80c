"""Connections: opening, closing, and what an unreachable libvirt looks like."""
from __future__ import annotations

import pytest

from migsec.errors import HypervisorUnavailableError
from migsec.virt import connect

from virt_helpers import TEST_URI


def test_connect_and_close_cleanly() -> None:
    with connect(TEST_URI) as conn:
        assert conn.driver == "TEST"
        assert conn.list_domains() == ["test"]
        cap = conn.capacity()
        assert cap.cpus > 0 and cap.memory_bytes > 0
    assert conn.closed
    conn.close()  # twice is harmless
    with pytest.raises(HypervisorUnavailableError, match="closed"):
        conn.list_domains()


def test_missing_socket_names_the_socket(tmp_path) -> None:
    sock = tmp_path / "no-such" / "libvirt-sock"
    uri = f"qemu+unix:///system?socket={sock}"
    with pytest.raises(HypervisorUnavailableError) as err:
        connect(uri)
    assert str(sock) in str(err.value)
    assert uri in str(err.value)


@pytest.mark.parametrize("uri", ["", "   "])
def test_empty_uri_is_refused(uri: str) -> None:
    with pytest.raises(HypervisorUnavailableError, match="invalid libvirt URI"):
        connect(uri)

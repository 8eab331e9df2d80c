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


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("test:///default", True),
        ("qemu:///system", True),
        ("qemu:///embed?root=/tmp/x", True),
        ("qemu+unix:///system?socket=/srv/lab/a/run/libvirt/libvirt-sock", False),
        ("qemu+ssh://root@hv2.example/system", False),
        ("qemu+tls://hv2.example/system", False),
    ],
)
def test_which_uris_see_local_files(uri: str, local: bool) -> None:
    from migsec.virt.connection import _same_filesystem

    assert _same_filesystem(uri) is local


def test_remote_style_connection_does_not_inspect_local_files(tmp_path) -> None:
    # Same path, but libvirt may be on another host: qemu-img must not read our file.
    import subprocess

    from migsec.virt import define_domain, describe_domain, rewrite_domain_xml
    from virt_helpers import data_xml

    (tmp_path / "images").mkdir()
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(tmp_path / "images" / "web1.qcow2"), "5M"],
                   check=True, capture_output=True)
    xml = rewrite_domain_xml(data_xml("web1.xml"), disk_map={"/var/lib/migsec-test": str(tmp_path)})
    with connect(TEST_URI, local_files=False) as conn:
        vda = describe_domain(conn, define_domain(conn, xml)).disks[0]
    assert vda.chain_source == "unavailable"
    assert vda.virtual_size != 5 * 1024 * 1024  # the test driver's own figure, not qemu-img's


def test_warm_capabilities_asks_the_driver_and_names_an_unreachable_libvirt(tmp_path) -> None:
    from migsec.virt import warm_capabilities

    assert warm_capabilities(TEST_URI) >= 0.0  # the test driver has host but no domain capabilities
    with pytest.raises(HypervisorUnavailableError, match="libvirt-sock"):
        warm_capabilities(f"qemu+unix:///system?socket={tmp_path}/libvirt-sock")

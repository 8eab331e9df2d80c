"""describe_domain and check_migratable against libvirt's test driver and real qemu-img images."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from migsec.errors import DomainNotFoundError, MappingError, UnsupportedDeviceError
from migsec.virt import (
    DomainState,
    check_migratable,
    define_domain,
    describe_domain,
    rewrite_domain_xml,
    set_tags,
)
from virt_helpers import data_xml

MiB = 1024 * 1024


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_default_test_domain(conn) -> None:
    xml = conn.raw.lookupByName("test").XMLDesc(0)
    info = describe_domain(conn, "test")
    assert (info.name, info.state, info.domain_type) == ("test", DomainState.RUNNING, "test")
    assert info.uuid in xml and info.persistent
    assert info.vcpus == 2
    assert info.memory_bytes == 8388608 * 1024 and info.current_memory_bytes == 2097152 * 1024
    (disk,) = info.disks
    assert (disk.target, disk.type, disk.source) == ("vda", "file", "/guest/diskimage1")
    # The file is not on this machine: no chain is invented, libvirt still gives sizes.
    assert disk.chain_source == "unavailable" and disk.backing_chain == ()
    assert disk.virtual_size is not None and disk.virtual_size > 0
    (nic,) = info.interfaces
    assert (nic.type, nic.source, nic.mac) == ("network", "default", "aa:bb:cc:dd:ee:ff")
    assert info.tags == ()


def test_lookup_by_uuid_gives_same_domain(conn) -> None:
    uuid = describe_domain(conn, "test").uuid
    assert describe_domain(conn, uuid).name == "test"
    assert describe_domain(conn, uuid.upper()).name == "test"


@pytest.mark.parametrize("missing", ["no-such-vm", "00000000-0000-4000-8000-000000000000"])
def test_missing_domain_is_named(conn, missing: str) -> None:
    with pytest.raises(DomainNotFoundError) as err:
        describe_domain(conn, missing)
    assert missing in str(err.value) and "test:///default" in str(err.value)


def test_defined_domain_from_file(conn) -> None:
    name = define_domain(conn, data_xml("web1.xml"))
    info = describe_domain(conn, name)
    assert info.state is DomainState.SHUTOFF and not info.state.active
    assert (info.vcpus, info.max_vcpus) == (1, 2)
    assert (info.memory_bytes, info.current_memory_bytes) == (512 * MiB, 256 * MiB)
    assert info.tags == ("tier:web", "owner:alice")
    assert [(d.target, d.device, d.format, d.source) for d in info.disks] == [
        ("vda", "disk", "qcow2", "/var/lib/migsec-test/images/web1.qcow2"),
        ("vdb", "disk", "raw", "/var/lib/migsec-test/data/web1-data.raw"),
        ("hdc", "cdrom", None, None),
    ]
    assert info.disks[2].readonly
    assert [(i.type, i.source, i.mac, i.model) for i in info.interfaces] == [
        ("network", "default", "52:54:00:6b:3c:01", "virtio"),
        ("bridge", "br-front", "52:54:00:6b:3c:02", "e1000"),
    ]
    assert info.boot.kernel == "/var/lib/migsec-test/images/vmlinuz"
    assert [d.files for d in info.disks] == [
        ("/var/lib/migsec-test/images/web1.qcow2",),
        ("/var/lib/migsec-test/data/web1-data.raw",),
        (),  # an empty cdrom has no file
    ]


def test_set_tags_round_trip(conn) -> None:
    set_tags(conn, "test", ["pci-dss", "  eu-west "])
    assert describe_domain(conn, "test").tags == ("pci-dss", "eu-west")
    set_tags(conn, "test", [])
    assert describe_domain(conn, "test").tags == ()


def test_backing_chain_from_libvirt_xml(conn) -> None:
    info = describe_domain(conn, define_domain(conn, data_xml("chain.xml")))
    (disk,) = info.disks
    assert disk.chain_source == "libvirt"
    assert [(b.path, b.format) for b in disk.backing_chain] == [
        ("/var/lib/migsec-test/images/chain1-mid.qcow2", "qcow2"),
        ("/var/lib/migsec-test/base/debian-base.raw", "raw"),
    ]
    assert disk.files[1:] == tuple(b.path for b in disk.backing_chain)
    assert info.boot.nvram == "/var/lib/migsec-test/nvram/chain1_VARS.fd"


def test_backing_chain_and_sizes_from_qemu_img(conn, tmp_path: Path) -> None:
    images, data = tmp_path / "images", tmp_path / "data"
    images.mkdir()
    data.mkdir()
    base, mid, top = tmp_path / "base.raw", images / "mid.qcow2", images / "web1.qcow2"
    qemu_img("create", "-f", "raw", str(base), "64M")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(mid))
    qemu_img("create", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    qemu_img("create", "-f", "raw", str(data / "web1-data.raw"), "3M")
    xml = rewrite_domain_xml(
        data_xml("web1.xml"),
        disk_map={"/var/lib/migsec-test/images": str(images), "/var/lib/migsec-test/data": str(data)},
    )
    info = describe_domain(conn, define_domain(conn, xml))
    vda, vdb = info.disks[0], info.disks[1]
    assert vda.chain_source == "qemu-img"
    assert [(b.path, b.format) for b in vda.backing_chain] == [(str(mid), "qcow2"), (str(base), "raw")]
    assert vda.virtual_size == 64 * MiB and vda.backing_chain[1].virtual_size == 64 * MiB
    assert vda.allocated_size is not None and vda.allocated_size < MiB  # fresh qcow2: metadata only
    assert vdb.virtual_size == 3 * MiB and vdb.backing_chain == ()
    assert (vda.files, vdb.files) == ((str(top), str(mid), str(base)), (str(data / "web1-data.raw"),))


def test_raw_disk_holding_a_qcow2_header_is_not_probed(conn, tmp_path: Path) -> None:
    # A guest can write a qcow2 header pointing at a host file into its raw disk;
    # describing it must not follow that "backing file".
    (tmp_path / "images").mkdir()
    (tmp_path / "data").mkdir()
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"x" * 4096)
    evil = tmp_path / "images" / "web1.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(evil))
    qemu_img("create", "-f", "raw", str(tmp_path / "data" / "web1-data.raw"), "1M")
    xml = rewrite_domain_xml(
        data_xml("web1.xml").replace("type='qcow2'", "type='raw'"),
        disk_map={"/var/lib/migsec-test": str(tmp_path)},
    )
    vda = describe_domain(conn, define_domain(conn, xml)).disks[0]
    assert vda.format == "raw"
    assert vda.backing_chain == () and vda.chain_source == "qemu-img"
    # Read as raw, the size is the file's (sector-rounded), not the 4 KiB the header claims.
    assert vda.virtual_size is not None and 0 <= vda.virtual_size - evil.stat().st_size < 512


def test_check_migratable_names_every_unmovable_device(conn) -> None:
    info = describe_domain(conn, define_domain(conn, data_xml("passthrough.xml")))
    with pytest.raises(UnsupportedDeviceError) as err:
        check_migratable(info, {"/var/lib/migsec-test/images": "/srv/b"})
    msg = str(err.value)
    assert "db1" in msg
    for needle in ("hostdev", "bus=0x3b", "'vdb'", "/dev/vg0/db1-data", "'vdc'", "rbd:pool/db1-logs", "'vdd'", "shareable"):
        assert needle in msg, needle
    assert "'vda'" not in msg


def test_check_migratable_accepts_mapped_block_and_network_disks(conn) -> None:
    info = describe_domain(conn, define_domain(conn, data_xml("passthrough.xml")))
    mapping = {
        "/var/lib/migsec-test/images": "/srv/b",
        "/dev/vg0": "/dev/vg-b",
        "rbd:pool/db1-logs": "pool-b/db1-logs",
    }
    with pytest.raises(UnsupportedDeviceError) as err:
        check_migratable(info, mapping)
    msg = str(err.value)
    assert "'vdb'" not in msg and "'vdc'" not in msg
    assert "'vdd'" in msg and "hostdev" in msg


def test_check_migratable_unmapped_file_disk(conn) -> None:
    info = describe_domain(conn, define_domain(conn, data_xml("web1.xml")))
    check_migratable(info)  # no map: only device kinds are checked
    with pytest.raises(MappingError) as err:
        check_migratable(info, {"/var/lib/migsec-test/images": "/srv/b/images"})
    assert "'vdb'" in str(err.value) and "/var/lib/migsec-test/data/web1-data.raw" in str(err.value)
    check_migratable(info, {"/var/lib/migsec-test": "/srv/b"})


def test_check_migratable_needs_backing_files_mapped(conn) -> None:
    info = describe_domain(conn, define_domain(conn, data_xml("chain.xml")))
    with pytest.raises(MappingError, match="debian-base.raw"):
        check_migratable(info, {"/var/lib/migsec-test/images": "/srv/b/images"})


def test_other_host_bound_devices_are_refused(conn) -> None:
    xml = data_xml("web1.xml").replace(
        "</devices>",
        """<filesystem type='mount' accessmode='passthrough'>
      <source dir='/srv/share'/><target dir='share0'/>
    </filesystem>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <interface type='hostdev' managed='yes'>
      <mac address='52:54:00:6b:3c:09'/>
      <source><address type='pci' domain='0x0000' bus='0x5e' slot='0x10' function='0x2'/></source>
    </interface>
  </devices>""",
    )
    info = describe_domain(conn, define_domain(conn, xml))
    assert info.unmovable == (
        "filesystem passthrough 'share0'",
        "interface type 'hostdev' (mac 52:54:00:6b:3c:09)",
        "tpm with backend 'emulator'",
    )
    with pytest.raises(UnsupportedDeviceError, match="'web1'.*share0.*52:54:00:6b:3c:09.*emulator"):
        check_migratable(info, {"/var/lib/migsec-test": "/srv/b"})

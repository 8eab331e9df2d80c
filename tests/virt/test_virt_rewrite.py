"""rewrite_domain_xml: mapped names change, nothing else does."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migsec.errors import MappingError, UnsupportedDeviceError
from migsec.virt import DomainXmlError, PathMap, define_domain, describe_domain, rewrite_domain_xml
from virt_helpers import data_xml, xml_differences

SRC = "/var/lib/migsec-test"


def test_web1_only_host_names_change() -> None:
    before = data_xml("web1.xml")
    after = rewrite_domain_xml(
        before,
        disk_map={f"{SRC}/images": "/srv/b/images", f"{SRC}/data": "/srv/b/data"},
        network_map={"default": "tenant-b"},
        bridge_map={"br-front": "br-b"},
    )
    assert xml_differences(before, after) == {
        ("/domain/os/kernel", "#text", f"{SRC}/images/vmlinuz", "/srv/b/images/vmlinuz"),
        ("/domain/os/initrd", "#text", f"{SRC}/images/initrd.img", "/srv/b/images/initrd.img"),
        ("/domain/devices/disk[1]/source", "file", f"{SRC}/images/web1.qcow2", "/srv/b/images/web1.qcow2"),
        ("/domain/devices/disk[2]/source", "file", f"{SRC}/data/web1-data.raw", "/srv/b/data/web1-data.raw"),
        ("/domain/devices/interface[1]/source", "network", "default", "tenant-b"),
        ("/domain/devices/interface[2]/source", "bridge", "br-front", "br-b"),
    }


def test_backing_chain_and_nvram_are_mapped_loader_kept() -> None:
    before = data_xml("chain.xml")
    after = rewrite_domain_xml(before, disk_map={SRC: "/srv/b"}, network_map={"tenant-a": "tenant-b"})
    diffs = xml_differences(before, after)
    assert ("/domain/devices/disk/backingStore/source", "file", f"{SRC}/images/chain1-mid.qcow2",
            "/srv/b/images/chain1-mid.qcow2") in diffs
    assert ("/domain/devices/disk/backingStore/backingStore/source", "file", f"{SRC}/base/debian-base.raw",
            "/srv/b/base/debian-base.raw") in diffs
    assert ("/domain/os/nvram", "#text", f"{SRC}/nvram/chain1_VARS.fd", "/srv/b/nvram/chain1_VARS.fd") in diffs
    assert len(diffs) == 5  # top image, two backing files, nvram, network; the OVMF loader is kept
    assert "/usr/share/OVMF/OVMF_CODE.fd" in after and "portgroup='web'" in after.replace('"', "'")


def test_unmapped_backing_file_is_named() -> None:
    with pytest.raises(MappingError) as err:
        rewrite_domain_xml(data_xml("chain.xml"), disk_map={f"{SRC}/images": "/srv/b/images", f"{SRC}/nvram": "/n"})
    msg = str(err.value)
    assert "'vda'" in msg and "backing file #2" in msg and f"{SRC}/base/debian-base.raw" in msg


def test_unmapped_disk_is_named() -> None:
    with pytest.raises(MappingError) as err:
        rewrite_domain_xml(data_xml("web1.xml"), disk_map={f"{SRC}/images": "/srv/b"})
    assert "'vdb'" in str(err.value) and f"{SRC}/data/web1-data.raw" in str(err.value)


def test_network_map_must_cover_networks_and_bridges() -> None:
    xml = data_xml("web1.xml")
    dm = {SRC: "/srv/b"}
    with pytest.raises(MappingError, match=r"52:54:00:6b:3c:01.*network 'default'"):
        rewrite_domain_xml(xml, disk_map=dm, network_map={"other": "x"})
    with pytest.raises(MappingError, match=r"52:54:00:6b:3c:02.*bridge 'br-front'"):
        rewrite_domain_xml(xml, disk_map=dm, bridge_map={})
    # Without maps the names are the same on both hosts.
    out = rewrite_domain_xml(xml, disk_map=dm)
    assert "network='default'" in out.replace('"', "'") and "bridge='br-front'" in out.replace('"', "'")


def test_runtime_port_of_source_host_is_dropped() -> None:
    live = data_xml("web1.xml").replace(
        "<source network='default'/>",
        "<source network='default' portid='9d0f2c84-5e1e-4b7a-9f3c-3b2f2d1a0c55' bridge='virbr0'/>",
    )
    out = rewrite_domain_xml(live, disk_map={SRC: "/srv/b"}, network_map={"default": "tenant-b"})
    assert "portid" not in out and "virbr0" not in out


def test_network_and_block_disks_map_by_key() -> None:
    xml = data_xml("passthrough.xml")
    out = rewrite_domain_xml(
        xml,
        disk_map={SRC: "/srv/b", "/dev/vg0": "/dev/vg-b", "rbd:pool/db1-logs": "pool-b/db1-logs"},
    )
    assert "/dev/vg-b/db1-data" in out and "pool-b/db1-logs" in out and "/srv/b/shared/quorum.raw" in out
    with pytest.raises(MappingError, match="'vdc'.*rbd:pool/db1-logs"):
        rewrite_domain_xml(xml, disk_map={SRC: "/srv/b", "/dev/vg0": "/dev/vg-b"})
    with pytest.raises(MappingError, match="'vdb'.*block device.*/dev/vg0/db1-data"):
        rewrite_domain_xml(xml, disk_map={SRC: "/srv/b"})


def test_volume_disks_are_refused() -> None:
    xml = data_xml("web1.xml").replace(
        f"<source file='{SRC}/data/web1-data.raw'/>", "<source pool='default' volume='web1-data'/>"
    ).replace("<disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>",
              "<disk type='volume' device='disk'>\n      <driver name='qemu' type='raw'/>")
    with pytest.raises(UnsupportedDeviceError, match="'vdb'.*volume"):
        rewrite_domain_xml(xml, disk_map={SRC: "/srv/b"})


def test_path_traversal_in_peer_xml_is_refused() -> None:
    xml = data_xml("web1.xml").replace(f"{SRC}/data/web1-data.raw", f"{SRC}/images/../../../../etc/shadow")
    with pytest.raises(MappingError, match=r"'vdb'.*'\.\.'"):
        rewrite_domain_xml(xml, disk_map={SRC: "/srv/b"})


def test_entities_and_doctype_are_refused() -> None:
    with pytest.raises(DomainXmlError, match="DOCTYPE"):
        rewrite_domain_xml(data_xml("entity.xml"), disk_map={"/": "/"})


@pytest.mark.parametrize("bad", ["<domain><name>x", "<pool/>", b"\xff\xfe<domain/>"])
def test_malformed_xml_is_refused(bad) -> None:
    with pytest.raises(DomainXmlError):
        rewrite_domain_xml(bad, disk_map={"/": "/"})


@pytest.mark.parametrize("bad_map", [{"images": "/srv"}, {SRC: "relative/dir"}, {SRC: ""}, {f"{SRC}/../x": "/srv"}])
def test_bad_disk_map_is_refused(bad_map) -> None:
    with pytest.raises(MappingError):
        rewrite_domain_xml(data_xml("web1.xml"), disk_map=bad_map)


def test_path_map_rules() -> None:
    m = PathMap({"/img": "/a", "/images": "/b", "/images/special": "/c", "/images/one.qcow2": "/d/uno.qcow2"})
    assert m.lookup("/images/x.qcow2") == "/b/x.qcow2"  # "/img" is not a prefix of "/images"
    assert m.lookup("/img/x") == "/a/x"
    assert m.lookup("/images/special/y") == "/c/y"  # longest directory wins
    assert m.lookup("/images/one.qcow2") == "/d/uno.qcow2"  # exact file wins
    assert m.lookup("/other/z") is None


def test_rewritten_xml_is_accepted_by_libvirt(conn) -> None:
    out = rewrite_domain_xml(
        data_xml("chain.xml"), disk_map={SRC: "/srv/b"}, network_map={"tenant-a": "tenant-b"}
    )
    info = describe_domain(conn, define_domain(conn, out))
    assert info.disks[0].source == "/srv/b/images/chain1-top.qcow2"
    assert [b.path for b in info.disks[0].backing_chain] == [
        "/srv/b/images/chain1-mid.qcow2", "/srv/b/base/debian-base.raw"]
    assert info.interfaces[0].source == "tenant-b"


_component = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12).filter(
    lambda s: s not in {".", ".."}
)
_dir = st.lists(_component, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=60, deadline=None)
@given(src=_dir, dst=_dir, rel=st.lists(_component, min_size=1, max_size=3))
def test_rewrite_maps_generated_paths_and_round_trips(src: str, dst: str, rel: list[str]) -> None:
    path = src + "/" + "/".join(rel)
    xml = data_xml("web1.xml").replace(f"{SRC}/images/web1.qcow2", path).replace(
        f"{SRC}/data/web1-data.raw", path + "-data"
    )
    out = rewrite_domain_xml(xml, disk_map={src: dst, SRC: SRC})
    disks = describe_source_paths(out)
    assert disks[0] == dst + "/" + "/".join(rel)
    assert disks[1] == dst + "/" + "/".join(rel) + "-data"
    back = rewrite_domain_xml(out, disk_map={dst: src, SRC: SRC})
    assert xml_differences(xml, back) == set()


def describe_source_paths(xml: str) -> list[str]:
    from migsec.virt.domxml import parse_domain_xml, view

    return [d.source for d in view(parse_domain_xml(xml)).disks if d.source]

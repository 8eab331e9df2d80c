"""incoming_domain_xml: B's rule for the XML of an incoming live migration."""
from __future__ import annotations

import functools

import pytest
from lxml import etree

from migsec.errors import MappingError, MigsecError, UnsupportedDeviceError
from migsec.virt.errors import DomainXmlError
from migsec.virt.incoming import FIRMWARE_DIRS, incoming_domain_xml
from virt_helpers import data_xml

NAME = "vm1"
UUID = "6f1c2a9e-3b7d-4c1e-9a55-2d0e8b7f4c11"
DISK_MAP = {"/srv/a/images": "/srv/b/images"}
BOOT = ("/var/cache/migsec/guest",)

rule = functools.partial(incoming_domain_xml, disk_map=DISK_MAP, expected_name=NAME,
                         expected_uuid=UUID, network_map={"default": "tenant-b"},
                         boot_dirs=BOOT)


def base() -> str:
    return data_xml("incoming-vm1.xml")


def edit(xml: str, fn) -> str:
    root = etree.fromstring(xml.encode())
    fn(root)
    return etree.tostring(root, encoding="unicode")


def add_device(xml: str, fragment: str) -> str:
    return edit(xml, lambda r: r.find("devices").append(etree.fromstring(fragment)))


def test_lab_like_xml_is_mapped_for_b() -> None:
    out = etree.fromstring(rule(base()).encode())
    assert out.find("devices/disk/source").get("file") == "/srv/b/images/vm1.qcow2"
    src = out.find("devices/interface/source")
    assert src.get("network") == "tenant-b" and src.get("bridge") is None and src.get("portid") is None
    assert out.find("seclabel") is None            # B labels the guest itself
    assert out.find("devices/serial/source") is None   # A's /dev/pts/N is not B's
    assert out.find("devices/console").get("tty") is None
    assert out.find("devices/serial/log").get("file") == "/var/log/libvirt/qemu/vm1-console.log"
    assert out.findtext("os/kernel") == "/var/cache/migsec/guest/vmlinuz"
    assert out.findtext("devices/emulator") == "/usr/bin/qemu-system-x86_64"
    assert out.find("metadata")[0].tag == "{https://migsec.example/xmlns/1}tags"


def test_paths_already_on_b_are_kept() -> None:
    xml = base().replace("/srv/a/images/vm1.qcow2", "/srv/b/images/vm1.qcow2")
    out = etree.fromstring(rule(xml).encode())
    assert out.find("devices/disk/source").get("file") == "/srv/b/images/vm1.qcow2"


def test_result_is_stable() -> None:
    once = rule(base())
    assert rule(once) == once


@pytest.mark.parametrize("name,uuid", [("vm2", UUID), (NAME, "6f1c2a9e-3b7d-4c1e-9a55-2d0e8b7f4c12")])
def test_another_domain_is_refused(name: str, uuid: str) -> None:
    with pytest.raises(DomainXmlError, match="domain|uuid"):
        incoming_domain_xml(base(), disk_map=DISK_MAP, expected_name=name, expected_uuid=uuid,
                            boot_dirs=BOOT)


def test_uppercase_uuid_is_the_same_domain() -> None:
    rule(base().replace(UUID, UUID.upper()))


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@pytest.mark.parametrize("fragment", [
    f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:arg value='-chardev'/></qemu:commandline>",
    f"<qemu:override xmlns:qemu='{QEMU_NS}'><qemu:device alias='x'/></qemu:override>",
])
def test_qemu_namespace_is_refused(fragment: str) -> None:
    xml = edit(base(), lambda r: r.append(etree.fromstring(fragment)))
    with pytest.raises(UnsupportedDeviceError, match="namespace"):
        rule(xml)


@pytest.mark.parametrize("fragment,match", [
    ("<hostdev mode='subsystem' type='pci'><source><address bus='0x01' slot='0x00'/></source></hostdev>",
     "hostdev"),
    ("<filesystem type='mount'><source dir='/etc'/><target dir='etc'/></filesystem>", "filesystem"),
    ("<interface type='direct'><source dev='eth0' mode='bridge'/></interface>", "interface type"),
    ("<interface type='ethernet'><script path='/tmp/x.sh'/></interface>", "interface type"),
    ("<serial type='dev'><source path='/dev/ttyS0'/><target port='1'/></serial>", "type 'dev'"),
    ("<channel type='tcp'><source mode='connect' host='10.0.0.1' service='25'/></channel>", "type 'tcp'"),
    ("<serial type='file'><source path='/etc/cron.d/evil'/><target port='1'/></serial>", "outside"),
    ("<channel type='unix'><source mode='bind' path='/run/libvirt/libvirt-sock'/></channel>", "outside"),
    ("<input type='passthrough' bus='virtio'><source evdev='/dev/input/event0'/></input>", "input"),
    ("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>", "TPM"),
    ("<graphics type='vnc' port='5900' listen='0.0.0.0'/>", "graphics"),
    ("<rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>", "rng"),
    ("<disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vdc'/></disk>", "volume"),
    ("<disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdc'/></disk>", "outside"),
    ("<disk type='file' device='disk'><source file='/srv/a/images/../../../etc/shadow'/>"
     "<target dev='vdc'/></disk>", r"'\.\.'"),
    ("<disk type='file' device='disk'><source file='/srv/b/images/x.qcow2'>"
     "<seclabel model='dac' relabel='yes'><label>0:0</label></seclabel></source>"
     "<target dev='vdc'/></disk>", "security label"),
    ("<sound model='ich9'><audio id='1'/></sound><audio id='1' type='file' path='/etc/motd'/>", "host path"),
    ("<audio id='1' type='pulseaudio' serverName='tcp:10.0.0.1'/>", "audio"),
    ("<redirdev bus='usb' type='tcp'><source mode='connect' host='10.0.0.1' service='4000'/></redirdev>",
     "type 'tcp'"),
    ("<smartcard mode='host'/>", "smartcard"),
    ("<rng model='virtio'><backend model='egd' type='tcp'><source mode='connect' host='10.0.0.1' "
     "service='708'/></backend></rng>", "type 'tcp'"),
    ("<interface type='user'><backend type='passt'/><portForward proto='tcp'>"
     "<range start='2022' to='22'/></portForward></interface>", "portForward"),
])
def test_host_resources_are_refused(fragment: str, match: str) -> None:
    xml = base()
    for piece in etree.fromstring(f"<x>{fragment}</x>"):
        xml = add_device(xml, etree.tostring(piece, encoding="unicode"))
    with pytest.raises(MigsecError, match=match):
        rule(xml)


def test_initrd_outside_boot_dirs_is_refused() -> None:
    xml = base().replace("/var/cache/migsec/guest/initrd.img", "/etc/shadow")
    with pytest.raises(MappingError, match="initrd"):
        rule(xml)


def test_backing_file_outside_mapping_is_refused() -> None:
    xml = base().replace("<backingStore/>", "<backingStore type='file'><format type='raw'/>"
                         "<source file='/var/lib/secret/base.raw'/><backingStore/></backingStore>")
    with pytest.raises(MappingError, match="backing file"):
        rule(xml)


def test_other_emulator_is_refused() -> None:
    xml = base().replace("/usr/bin/qemu-system-x86_64", "/tmp/qemu-system-x86_64")
    with pytest.raises(UnsupportedDeviceError, match="emulator"):
        rule(xml)
    with pytest.raises(UnsupportedDeviceError, match="emulator"):
        rule(base(), emulators={"/usr/libexec/qemu-kvm"})


def test_static_seclabel_is_refused() -> None:
    xml = base().replace("type='dynamic' model='dac' relabel='yes'", "type='static' model='dac' relabel='no'")
    with pytest.raises(UnsupportedDeviceError, match="security label"):
        rule(xml)


def test_unmapped_network_is_refused_and_b_names_kept() -> None:
    with pytest.raises(MappingError, match="network 'other'"):
        rule(base().replace("network='default'", "network='other'"))
    out = rule(base().replace("network='default'", "network='tenant-b'"))
    assert "network=\"tenant-b\"" in out or "network='tenant-b'" in out


def test_entities_are_refused() -> None:
    xml = "<?xml version='1.0'?><!DOCTYPE domain [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>" + \
        base().replace("<cmdline>console=ttyS0", "<cmdline>&x;")
    with pytest.raises(DomainXmlError, match="DOCTYPE"):
        rule(xml)


def test_sysinfo_fwcfg_file_is_a_host_path() -> None:
    xml = edit(base(), lambda r: r.append(etree.fromstring(
        "<sysinfo type='fwcfg'><entry name='opt/com.example/x' file='/etc/shadow'/></sysinfo>")))
    with pytest.raises(UnsupportedDeviceError, match="entry"):
        rule(xml)


def test_firmware_must_be_read_only_unless_the_guest_owns_it() -> None:
    def loader(readonly: str):
        def fn(r):
            el = etree.SubElement(r.find("os"), "loader", readonly=readonly, type="pflash")
            el.text = "/usr/share/OVMF/OVMF_CODE.fd"
        return fn
    dirs = BOOT + FIRMWARE_DIRS
    out = etree.fromstring(rule(edit(base(), loader("yes")), boot_dirs=dirs).encode())
    assert out.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE.fd"
    with pytest.raises(UnsupportedDeviceError, match="writable"):
        rule(edit(base(), loader("no")), boot_dirs=dirs)


def test_redirdev_over_spice_is_kept() -> None:
    xml = add_device(base(), "<redirdev bus='usb' type='spicevmc'/>")
    assert etree.fromstring(rule(xml).encode()).find("devices/redirdev").get("type") == "spicevmc"

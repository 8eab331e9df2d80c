"""The test guest: its build and the parsing of what it prints (no lab needed)."""
from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from migsec.errors import LabError
from migsec.lab import guest as g
from migsec.lab.lab import parse_size

BOOT = "0123456789abcdef"


def test_console_counts_only_complete_lines():
    # A save can cut a line anywhere; the cut piece must not count.
    log = (b"\x1b[2JSeaBIOS...MIGSEC-BOOT boot=" + BOOT.encode() + b" seed=x mem=8\r\n"
           b"MIGSEC-COUNT 0\r\nMIGSEC-COUNT 1\r\nMIGSEC-COUNT 2\r\nMIGSEC-COUNT 3")
    c = g.parse_console(log)
    assert c.boots == [BOOT]
    assert c.counters == [0, 1, 2]
    assert g.last_counter(log) == 2


def test_console_ignores_a_continued_fragment():
    # What a destination log starts with after a restore: the rest of a cut line.
    log = b"UNT 41\r\nMIGSEC-COUNT 42\r\nMIGSEC-COUNT 43\r\n"
    assert g.parse_console(log).counters == [42, 43]
    assert g.parse_console(log).boots == []


def test_console_parses_memory_and_disk_lines():
    sha = hashlib.sha256(b"x").hexdigest()
    log = (f"MIGSEC-MEM-INIT boot={BOOT} mib=8 sha256={sha}\n"
           f"MIGSEC-MEM boot={BOOT} seq=1 sha256={sha} ok\n"
           f"MIGSEC-MEM boot={BOOT} seq=2 sha256={'0' * 64} BAD\n"
           f"MIGSEC-DISK seq=1 block=1 sha256={sha}\n"
           f"MIGSEC-DISKCHECK boot={BOOT} blocks=1 bad=0 last=1\n"
           f"MIGSEC-ERROR no /dev/vda\n").encode()
    c = g.parse_console(log)
    assert [(m.seq, m.ok) for m in c.memory] == [(0, True), (1, True), (2, False)]
    assert c.disk_writes == [(1, sha)]
    assert c.disk_checks == [g.DiskCheck(BOOT, 1, 0)]
    assert c.errors == ["MIGSEC-ERROR no /dev/vda"]


def test_missing_log_parses_as_empty(tmp_path):
    assert g.last_counter(tmp_path / "nothing.log") is None


def test_expected_memory_checksum_depends_on_seed_and_size():
    a = g.expected_memory_sha256("s1", 2)
    assert a != g.expected_memory_sha256("s2", 2)
    assert a != g.expected_memory_sha256("s1", 3)
    # The pattern itself: block 1 starts with its own header line.
    line0 = "migsec-mem seed=s1 block=0".ljust(63).encode() + b"\n"
    base = ("migsec-mem seed=s1".ljust(63).encode() + b"\n") * 16383
    line1 = "migsec-mem seed=s1 block=1".ljust(63).encode() + b"\n"
    assert a == hashlib.sha256(line0 + base + line1 + base).hexdigest()


@pytest.mark.parametrize("text,expected", [
    ("256M", 256 << 20), ("1G", 1 << 30), ("512MiB", 512 << 20), ("4096", 4096), ("2k", 2048),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "1X", "-1G", "one"])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(LabError, match="size"):
        parse_size(text)


def _image(tmp_path):
    return g.GuestImage(tmp_path / "vmlinuz", tmp_path / "initrd.cpio", "6.1", "k")


def test_domain_xml_refuses_a_region_that_does_not_fit(tmp_path):
    with pytest.raises(LabError, match="does not fit"):
        g.guest_domain_xml("vm", _image(tmp_path), "/d.qcow2", memory_mib=128, region_mib=100)


@pytest.mark.parametrize("name", ["", "a b", "x/../y", "vm;rm"])
def test_domain_xml_refuses_bad_names(tmp_path, name):
    with pytest.raises(LabError, match="guest name"):
        g.guest_domain_xml(name, _image(tmp_path), "/d.qcow2")


def test_domain_xml_carries_the_workload_parameters(tmp_path):
    from lxml import etree
    xml = g.guest_domain_xml("vm7", _image(tmp_path), "/img/vm7.qcow2", memory_mib=200,
                             region_mib=32, seed="s9", domain_type="kvm")
    root = etree.fromstring(xml.encode())
    assert root.get("type") == "kvm"
    assert root.findtext("memory") == "200"
    cmdline = root.findtext("os/cmdline").split()
    assert {"console=ttyS0", "migsec.seed=s9", "migsec.mem=32"} <= set(cmdline)
    assert root.find("devices/disk/source").get("file") == "/img/vm7.qcow2"
    assert root.find("devices/serial/log").get("file") == "/var/log/libvirt/qemu/vm7-console.log"


needs_guest_inputs = pytest.mark.skipif(
    not g.kernel_versions() or not g.BUSYBOX.is_file() or not os.access("/boot", os.R_OK),
    reason="needs linux-image-cloud-amd64 and busybox-static (scripts/setup.sh)")


@needs_guest_inputs
def test_build_guest_is_cached_and_holds_init_and_modules(tmp_path):
    img = g.build_guest(tmp_path)
    built = img.initrd.stat().st_mtime_ns
    again = g.build_guest(tmp_path)
    assert again == img and img.initrd.stat().st_mtime_ns == built  # not rebuilt
    names = subprocess.run(["cpio", "-it", "--quiet"], stdin=open(img.initrd, "rb"),
                           capture_output=True, text=True, check=True).stdout.split()
    assert "init" in names and "bin/busybox" in names
    assert {f"lib/modules/{m}.ko" for m in g.VIRTIO_MODULES} <= set(names)
    assert img.kernel.read_bytes() == open(f"/boot/vmlinuz-{img.kernel_version}", "rb").read()


@needs_guest_inputs
def test_cache_key_follows_the_init_script(tmp_path, monkeypatch):
    version = g.kernel_versions()[-1]
    before = g.guest_cache_key(version)
    script = tmp_path / "init.sh"
    script.write_bytes(g.INIT_SCRIPT.read_bytes() + b"\n# changed\n")
    monkeypatch.setattr(g, "INIT_SCRIPT", script)
    assert g.guest_cache_key(version) != before


def test_verify_disk_finds_a_corrupted_block(tmp_path):
    disk = tmp_path / "d.raw"
    blocks = bytearray(g.BLOCK_SIZE * 4)
    for k in (1, 2):
        payload = (b"MIGSECBLK seq=%d\n" % k).ljust(g.PAYLOAD_SIZE, b"z")
        blocks[k * g.BLOCK_SIZE:(k + 1) * g.BLOCK_SIZE] = payload + hashlib.sha256(payload).hexdigest().encode()
    blocks[2 * g.BLOCK_SIZE + 100] ^= 1
    disk.write_bytes(bytes(blocks))
    report = g.verify_disk(disk, "raw")
    assert sorted(report.blocks) == [1, 2]
    assert report.bad == [2]


def test_verify_disk_names_a_missing_image(tmp_path):
    with pytest.raises(LabError, match="does not exist"):
        g.verify_disk(tmp_path / "none.qcow2")

"""Save and restore of a real QEMU (TCG) domain through libvirt's embedded QEMU driver.

The test driver cannot restore paused or with a replacement XML, which is exactly
what a migration destination does, so this runs the real thing in-process
(``qemu:///embed``, no daemon): a diskful SeaBIOS guest is saved on "host A",
its images move to "host B"'s directory, and it is restored paused from the
rewritten XML. Needs root and qemu-system-x86_64; a few seconds.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsec.errors import SaveImageError
from migsec.virt import (
    Connection,
    DomainState,
    DomainXmlError,
    check_save_image,
    connect,
    define_domain,
    describe_domain,
    destroy_domain,
    domain_state,
    rebase_image,
    restore_domain,
    resume_domain,
    save_domain,
    save_image_restore_xml,
    start_domain,
    suspend_domain,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver needs root here"),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
        reason="qemu-system-x86_64 / qemu-img not installed (scripts/setup.sh installs them)",
    ),
]

UUID = "5e0d3c1a-7b2f-4d8e-9a61-3f4b2c1d0e07"
DOMAIN_XML = """<domain type='qemu'>
  <name>emb-vm</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{images}/emb-vm.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>"""


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Connection]:
    root = tmp_path_factory.mktemp("embed-root")
    (root / "etc").mkdir()
    # No virtlogd, cgroups or relabelling in a throwaway in-process driver.
    (root / "etc" / "qemu.conf").write_text(
        'stdio_handler = "file"\ncgroup_controllers = [ ]\nuser = "root"\ngroup = "root"\n'
        'dynamic_ownership = 0\nremember_owner = 0\nsecurity_driver = "none"\n'
    )
    conn = connect(f"qemu:///embed?root={root}")
    try:
        yield conn
    finally:
        for dom in conn.raw.listAllDomains(0):
            if dom.isActive():
                dom.destroy()
        conn.close()


@pytest.fixture
def hosts(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "host-a" / "images", tmp_path / "host-b" / "images"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    qemu_img("create", "-f", "raw", str(a / "base.raw"), "16M")
    qemu_img("create", "-f", "qcow2", "-b", str(a / "base.raw"), "-F", "raw", str(a / "emb-vm.qcow2"))
    return a, b


def move_images(a: Path, b: Path) -> None:
    """What the transfer layer does: copy the chain to B, point the top at B's base, drop A's."""
    for f in ("base.raw", "emb-vm.qcow2"):
        shutil.copy2(a / f, b / f)
    rebase_image(str(b / "emb-vm.qcow2"), backing=str(b / "base.raw"), backing_format="raw")
    shutil.rmtree(a)


def test_save_then_restore_paused_with_rewritten_xml(qemu: Connection, hosts, tmp_path: Path) -> None:
    a, b = hosts
    name = define_domain(qemu, DOMAIN_XML.format(uuid=UUID, images=a))
    start_domain(qemu, name)
    info = describe_domain(qemu, name)
    assert info.state is DomainState.RUNNING and info.domain_type == "qemu"
    assert [bf.path for bf in info.disks[0].backing_chain] == [str(a / "base.raw")]
    assert info.disks[0].virtual_size == 16 * 1024 * 1024

    suspend_domain(qemu, name)
    image = tmp_path / "emb-vm.save"
    save_domain(qemu, name, str(image), paused=True)
    assert domain_state(qemu, name) is DomainState.SHUTOFF and image.stat().st_size > 0

    move_images(a, b)
    xml = save_image_restore_xml(qemu, str(image), uuid=UUID, disk_map={str(a): str(b)})
    assert str(a) not in xml
    assert restore_domain(qemu, str(image), xml=xml, paused=True) == name
    assert domain_state(qemu, name) is DomainState.PAUSED
    restored = describe_domain(qemu, name)
    assert restored.disks[0].source == str(b / "emb-vm.qcow2")
    assert [bf.path for bf in restored.disks[0].backing_chain] == [str(b / "base.raw")]
    resume_domain(qemu, name)
    assert domain_state(qemu, name) is DomainState.RUNNING
    destroy_domain(qemu, name)


def test_abi_incompatible_xml_and_foreign_image_are_refused(qemu: Connection, hosts, tmp_path: Path) -> None:
    a, _ = hosts
    name = define_domain(qemu, DOMAIN_XML.format(uuid=UUID, images=a))
    start_domain(qemu, name)
    image = tmp_path / "emb-vm.save"
    save_domain(qemu, name, str(image))
    with pytest.raises(SaveImageError, match="emb-vm"):
        check_save_image(qemu, str(image), uuid="00000000-0000-4000-8000-000000000001")
    xml = check_save_image(qemu, str(image), uuid=UUID)
    # One more vCPU than the saved guest had: libvirt's ABI check must refuse it.
    bad = xml.replace("<vcpu placement='static'>1</vcpu>", "<vcpu placement='static'>2</vcpu>")
    assert bad != xml
    with pytest.raises(DomainXmlError, match="emb-vm"):
        restore_domain(qemu, str(image), xml=bad, paused=True)
    assert domain_state(qemu, name) is DomainState.SHUTOFF
    assert restore_domain(qemu, str(image), xml=xml, paused=True) == name
    assert domain_state(qemu, name) is DomainState.PAUSED
    destroy_domain(qemu, name)

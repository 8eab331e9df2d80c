"""Running hooks/qemu as libvirtd does, and the domain XML and ledger helpers of the hook tests."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from migsec.audit import Ledger

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "hooks" / "qemu"


def run_hook(site_config: Path | None, *args: str, stdin: bytes = b"",
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run hooks/qemu the way libvirtd does: four arguments, XML on stdin, a minimal env."""
    environ = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    if site_config is not None:
        environ["MIGSEC_CONFIG"] = str(site_config)
    environ.update(env or {})
    return subprocess.run([sys.executable, str(HOOK), *args], input=stdin, capture_output=True,
                          env=environ, cwd="/", timeout=60, check=False)


UUID = "6a1e0c1e-1111-2222-3333-444455556666"


def domain_xml(disk: str, *, backing: str | None = None, network: str = "default",
               bridge: str | None = None, kernel: str | None = None) -> bytes:
    backing_xml = (f"<backingStore type='file'><format type='qcow2'/><source file='{backing}'/>"
                   f"<backingStore/></backingStore>") if backing else ""
    iface = (f"<interface type='bridge'><mac address='52:54:00:00:00:02'/><source bridge='{bridge}'/>"
             f"<model type='virtio'/></interface>") if bridge else ""
    os_kernel = f"<kernel>{kernel}</kernel>" if kernel else ""
    return (f"""<domain type='qemu'>
  <name>vm1</name>
  <uuid>{UUID}</uuid>
  <metadata><migsec:tags xmlns:migsec="https://migsec.example/xmlns/1"><migsec:tag>web</migsec:tag></migsec:tags></metadata>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type>{os_kernel}</os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>{backing_xml}<target dev='vda' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:00:00:01'/><source network='{network}' portid='0d4b' bridge='virbr0'/><model type='virtio'/></interface>
    {iface}
  </devices>
</domain>""").encode()


def entries(site):
    return [(e.kind, dict(e.body)) for e in Ledger(site.ledger).entries()]

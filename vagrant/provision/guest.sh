#!/usr/bin/env bash
# The busybox test guest (no download: Debian's cloud kernel + busybox-static). Built on both
# hypervisors, so its kernel and initramfs exist at the same path on each; defined and started
# on hv-a only.
set -euo pipefail
/opt/migsec/bin/python - "$MIGSEC_HOST" <<'PY'
import subprocess, sys
from pathlib import Path
from migsec.lab.guest import build_guest, create_disk, guest_domain_xml

image = build_guest()
print(f"guest: kernel {image.kernel}, initramfs {image.initrd}")
if sys.argv[1] != "hv-a":
    sys.exit(0)
names = subprocess.run(["virsh", "list", "--all", "--name"], capture_output=True, text=True,
                       check=True).stdout.split()
if "vm1" not in names:
    disk = Path("/var/lib/libvirt/images/vm1.qcow2")
    if not disk.exists():
        create_disk(disk, "1G")
    kvm = Path("/dev/kvm").exists()
    xml = Path("/var/lib/libvirt/images/vm1.xml")
    xml.write_text(guest_domain_xml("vm1", image, disk, memory_mib=256,
                                    domain_type="kvm" if kvm else "qemu"))
    subprocess.run(["virsh", "define", str(xml)], check=True)
state = subprocess.run(["virsh", "domstate", "vm1"], capture_output=True, text=True, check=True).stdout
if "running" not in state:
    subprocess.run(["virsh", "start", "vm1"], check=True)
print("guest: vm1 runs on hv-a; its counter is in /var/log/libvirt/qemu/vm1-console.log")
PY

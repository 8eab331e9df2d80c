"""Figures of the lab: guest build, lab up/down, save on A + restore on B of a 256 MiB guest.

Run as root: ``.venv/bin/python bench/bench_lab.py``. Prints figures, asserts nothing.
"""
from __future__ import annotations

import secrets
import subprocess
import tempfile
import time
from pathlib import Path

from migsec import virt
from migsec.lab import Lab, build_guest


def timed(fn):
    t0 = time.monotonic()
    result = fn()
    return result, time.monotonic() - t0


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="migsec-bench-") as tmp:
        _, cold = timed(lambda: build_guest(Path(tmp) / "cache", force=True))
        _, cached = timed(lambda: build_guest(Path(tmp) / "cache"))
        print(f"guest build: cold {cold:.3f} s, cached {cached * 1000:.1f} ms")

        lab = Lab(Path(tmp) / "lab", "b" + secrets.token_hex(3))
        try:
            _, up = timed(lambda: lab.up(2, guest=None))
            print(f"lab up (2 hosts, no guest): {up:.2f} s")
            lab.define_guest("a", "vm1", memory="256M", disk_size="1G")
            _, boot = timed(lambda: lab.start_guest("a", "vm1"))
            print(f"guest boot to a filled 64 MiB region (TCG): {boot:.2f} s")
            time.sleep(3)
            a, b = lab.host("a"), lab.host("b")
            save = a.image_dir / "vm1.save"
            with virt.connect(a.libvirt_uri) as conn_a:
                uuid = virt.describe_domain(conn_a, "vm1").uuid
                _, t_save = timed(lambda: virt.save_domain(conn_a, "vm1", str(save)))
            print(f"save 256 MiB guest: {t_save:.2f} s, image {save.stat().st_size / 1e6:.1f} MB")
            for f in (save, a.image_dir / "vm1.qcow2"):
                subprocess.run(["cp", "--sparse=always", str(f), str(b.image_dir)], check=True)
            with virt.connect(b.libvirt_uri) as conn_b:
                xml = virt.save_image_restore_xml(conn_b, str(b.image_dir / "vm1.save"), uuid=uuid,
                                                  disk_map={str(a.image_dir): str(b.image_dir)})
                _, t_restore = timed(lambda: virt.restore_domain(
                    conn_b, str(b.image_dir / "vm1.save"), xml=xml, paused=False))
            print(f"restore on B: {t_restore:.2f} s")
        finally:
            _, down = timed(lab.down)
            print(f"lab down (guest running on B): {down:.2f} s")


if __name__ == "__main__":
    main()

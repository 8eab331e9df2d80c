"""How libvirt writes a save image, seen from outside while it writes (prints, asserts nothing).

Run as root: ``.venv/bin/python bench/probe_save_image.py [--memory 256M] [--runs 2]``.
For each run: boots the lab's test guest on one lab host, saves it with
``migsec.virt.save_domain`` while a follower polls the file, and prints the file's first
bytes during and after the save, and whether the content followed during the save
(``GrowingFileSource``, which sends whole blocks as they appear) is the final file's.
This is the empirical basis of streaming the memory image while libvirt writes it.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from migsec import virt
from migsec.lab import Lab
from migsec.transfer import file_digest
from migsec.transfer.source import GrowingFileSource, WriterOutcome


def save_in_background(outcome: WriterOutcome, uri: str, name: str, path: str) -> None:
    """Run ``virt.save_domain`` in its own thread, its end recorded in ``outcome``."""

    def save() -> None:
        with virt.connect(uri) as conn:
            virt.save_domain(conn, name, path, paused=False)

    threading.Thread(target=outcome.record, args=(save,), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="probe-save-"))
    lab = Lab(workdir / "lab", "ps" + secrets.token_hex(2))
    try:
        lab.up(2, guest=None, timeout=300)
        h = lab.host("a")
        for run in range(args.runs):
            name = f"probe{run}"
            lab.ensure_guest("a", name, memory=args.memory, disk_size="64M", region_mib=32, timeout=120)
            path = h.image_dir / f"{name}.save"
            saver = WriterOutcome()
            heads: dict[bytes, int] = {}
            sizes: list[tuple[float, int]] = []
            src = GrowingFileSource(1, "memory", "memory", path, writer=saver, max_size=8 << 30,
                                    head=(b"LibvirtQemudPart", b"LibvirtQemudSave"),
                                    complete_on_final_head=True)  # as migsecd follows it
            t0 = time.monotonic()
            save_in_background(saver, h.libvirt_uri, name, str(path))
            src.start_digest()
            complete_at = None
            while not saver.finished():
                if complete_at is None and src.digest_ready:
                    complete_at = time.monotonic() - t0
                try:
                    with open(path, "rb") as fh:
                        head = fh.read(16)
                    sizes.append((time.monotonic() - t0, os.path.getsize(path)))
                    heads[head] = heads.get(head, 0) + 1
                except FileNotFoundError:
                    pass
                time.sleep(0.02)
            took = time.monotonic() - t0
            if saver.error() is not None:
                print(f"run {run}: save failed: {saver.error()}")
                continue
            with open(path, "rb") as fh:
                final_head = fh.read(96)
            try:
                followed = src.digest()[0]
            except Exception as exc:  # printed: this is what the probe is for
                followed = f"failed: {exc}"
            final = file_digest(path)
            half = next((t for t, n in sizes if n >= os.path.getsize(path) / 2), None)
            print(f"run {run}: save {took:.2f} s, image {os.path.getsize(path) / 2**20:.1f} MiB, "
                  f"half of it on disk after {half if half is None else round(half, 2)} s")
            print(f"  magic seen while saving: {dict((k.decode(errors='replace'), v) for k, v in heads.items())}")
            print(f"  after the save: {final_head[:16]!r}; header fields {final_head[16:36].hex()}")
            print(f"  followed stream complete (final magic seen) after "
                  f"{'-' if complete_at is None else round(complete_at, 2)} s, save returned after {took:.2f} s")
            print(f"  followed digest == final file digest: {followed == final} "
                  f"({str(followed)[:16]}.. vs {final[:16]}..)")
            h.virsh("undefine", name, check=False)
    finally:
        lab.down()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

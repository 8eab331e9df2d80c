"""How long libvirtd waits for migsec's qemu hook, per phase (prints; asserts nothing).

Runs hooks/qemu as libvirtd does (a fresh interpreter, argv, XML on stdin) against a real
domain setup in a temporary directory, and also with a ledger that already holds many
entries (each hook run finds the chain tip and the signer anew).

    .venv/bin/python bench/bench_hook.py [--runs 10] [--ledger-entries 2000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from migsec.audit import Ledger
from migsec.pki import CertificateAuthority, DomainIdentity

REPO = Path(__file__).resolve().parents[1]
HOOK = REPO / "hooks" / "qemu"
XML = """<domain type='qemu'><name>vm1</name><uuid>6a1e0c1e-1111-2222-3333-444455556666</uuid>
<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>
<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
<interface type='network'><source network='default'/></interface></devices></domain>"""


def setup(root: Path) -> Path:
    ca = CertificateAuthority.create(root / "ca", "bench CA")
    ca.issue_domain("cloud-b.example", root / "pki")
    for d in ("state", "images", "policies"):
        (root / d).mkdir()
    (root / "images" / "vm1.qcow2").write_bytes(b"")
    config = root / "migsecd.toml"
    config.write_text(f"""[domain]
id = "cloud-b.example"
key = "pki/domain-key.pem"
certificate = "pki/domain-cert.pem"
trust = ["pki/ca-cert.pem"]
[paths]
state_dir = "state"
policy_dir = "policies"
[storage]
image_dir = "{root}/images"
map = {{ "/src/images" = "{root}/images" }}
""")
    return config


def time_hook(config: Path, args: list[str], stdin: bytes, runs: int) -> list[float]:
    env = {"PATH": "/usr/bin:/bin", "MIGSEC_CONFIG": str(config)}
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(HOOK), *args], input=stdin, env=env,
                       capture_output=True, check=False)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--ledger-entries", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = setup(root)
        foreign = XML.format(disk="/src/images/vm1.qcow2").encode()
        local = XML.format(disk=f"{root}/images/vm1.qcow2").encode()
        baseline = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=False)
            baseline.append(time.perf_counter() - t0)
        cases = [
            ("python -c pass (interpreter start)", None, None),
            ("prepare begin (no-op)", ["vm1", "prepare", "begin", "-"], local),
            ("restore begin, local XML (unchanged)", ["vm1", "restore", "begin", "-"], local),
            ("restore begin, foreign XML (mapped)", ["vm1", "restore", "begin", "-"], foreign),
            ("migrate begin (refused + audited)", ["vm1", "migrate", "begin", "-"], foreign),
            ("started begin (audited)", ["vm1", "started", "begin", "-"], local),
        ]
        print(f"hook run time over {args.runs} runs, {os.cpu_count()} CPUs (median / max, ms)")
        for label, argv, stdin in cases:
            times = baseline if argv is None else time_hook(config, argv, stdin, args.runs)
            print(f"  {label:<42} {statistics.median(times) * 1e3:7.1f} / {max(times) * 1e3:7.1f}")
        ledger = Ledger(root / "state" / "ledger.jsonl",
                        DomainIdentity.load(root / "pki" / "domain-key.pem", root / "pki" / "domain-cert.pem"))
        for i in range(args.ledger_entries):
            ledger.append("bench-filler", None, {"i": i})
        times = time_hook(config, ["vm1", "started", "begin", "-"], local, args.runs)
        print(f"  {'started begin, ledger of %d entries' % args.ledger_entries:<42} "
              f"{statistics.median(times) * 1e3:7.1f} / {max(times) * 1e3:7.1f}")
        # the ledger's share of that, without the interpreter start: one append by a fresh
        # Ledger object (what each hook process pays to find the chain tip and signer)
        times = []
        for _ in range(args.runs * 5):
            fresh = Ledger(ledger.path, ledger.identity)
            t0 = time.perf_counter()
            fresh.append("bench-filler", None, {"i": -1})
            times.append(time.perf_counter() - t0)
        print(f"  {'Ledger.append, fresh object, same ledger':<42} "
              f"{statistics.median(times) * 1e3:7.2f} / {max(times) * 1e3:7.2f}")


if __name__ == "__main__":
    main()

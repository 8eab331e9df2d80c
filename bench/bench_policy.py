"""Policy decision point benchmark: load time and per-decision latency (prints only).

    .venv/bin/python bench/bench_policy.py [--rounds N]

Measures the shipped default migration policies (a `migrate` and a `receive-migration`
decision through authorize(), as the daemon calls it) and the largest policy of the XACML
conformance suite in ../shared/xacml-conformance (or $MIGSEC_XACML_SUITE) with its request.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from migsec.policy import DEFAULT_DIR, PDP, authorize, load_policies, parse_request  # noqa: E402
from migsec.policy import attributes as A  # noqa: E402

SUITE = Path(os.environ.get("MIGSEC_XACML_SUITE") or REPO.parent / "shared" / "xacml-conformance")


def timings(fn: Callable[[], object], rounds: int) -> list[float]:
    for _ in range(min(100, rounds)):  # warm caches
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def report(name: str, us: list[float]) -> None:
    us = sorted(us)
    p50 = statistics.median(us)
    p99 = us[min(len(us) - 1, int(len(us) * 0.99))]
    print(f"  {name:44s} p50 {p50:8.1f} us   p99 {p99:8.1f} us   ({len(us)} runs)")


def bench_defaults(rounds: int) -> None:
    print(f"default policies ({DEFAULT_DIR}):")
    load = timings(lambda: PDP.from_directory(DEFAULT_DIR), max(20, rounds // 50))
    report("load (3 files, parse + static checks)", load)
    pdp = PDP.from_directory(DEFAULT_DIR)
    subject = {"user-id": "alice", "roles": ["migration-admin"], "source-domain": "cloud-a.example"}
    resource = {"vm-name": "vm1", "vm-uuid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "vcpus": 4,
                "memory-bytes": 4 << 30, "disk-bytes": 20 << 30, "tags": ["web"]}
    env = {"source-domain": "cloud-a.example", "destination-domain": "cloud-b.example"}
    for action in (A.ACTION_MIGRATE, A.ACTION_RECEIVE):
        d = authorize(pdp, subject=subject, resource=resource, action=action, environment=env)
        us = timings(lambda: authorize(pdp, subject=subject, resource=resource, action=action, environment=env), rounds)
        report(f"authorize({action}) -> {d.decision}", us)
    denied = dict(env, **{"destination-domain": "rogue.example"})
    d = authorize(pdp, subject=subject, resource=resource, action=A.ACTION_MIGRATE, environment=denied)
    us = timings(lambda: authorize(pdp, subject=subject, resource=resource, action=A.ACTION_MIGRATE,
                                   environment=denied), rounds)
    report(f"authorize(migrate, untrusted) -> {d.decision}", us)


def bench_largest_conformance(rounds: int) -> None:
    if not SUITE.exists():
        print(f"conformance suite not found at {SUITE}; skipped")
        return
    candidates = sorted((p for p in SUITE.rglob("Policy.xml") if (p.parent / "Request.xml").exists()),
                        key=lambda p: p.stat().st_size, reverse=True)
    for policy in candidates:
        try:
            load_policies([policy])
        except Exception:  # noqa: BLE001 - the largest may be an XPath case this PDP refuses
            continue
        break
    else:
        print("no loadable conformance policy found")
        return
    request_bytes = (policy.parent / "Request.xml").read_bytes()
    print(f"largest loadable conformance policy: {policy.relative_to(SUITE)} ({policy.stat().st_size} bytes)")
    report("load (parse + static checks)", timings(lambda: PDP.from_files([policy]), max(20, rounds // 50)))
    pdp = PDP.from_files([policy])
    report("parse XML request", timings(lambda: parse_request(request_bytes), rounds))
    request = parse_request(request_bytes)
    decision = pdp.evaluate(request).results[0].decision
    report(f"evaluate parsed request -> {decision}", timings(lambda: pdp.evaluate(request), rounds))
    report("parse + evaluate + serialise response",
           timings(lambda: pdp.evaluate(parse_request(request_bytes)).to_xml(), rounds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5000)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    bench_defaults(args.rounds)
    bench_largest_conformance(args.rounds)


if __name__ == "__main__":
    main()

"""What B's libvirt RPC filter costs: the captured real p2p migration replayed through RpcFilter.

Run by hand: .venv/bin/python bench/bench_libvirt_rpc.py   (prints; asserts nothing)
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from migsec.protocol.libvirt_rpc import KEEPALIVE_PING, KEEPALIVE_PROGRAM, Header, MessageType
from migsec.protocol.libvirt_rpc import RpcFilter, RpcPolicy, encode_packet
from migsec.virt.incoming import incoming_domain_xml

CAPTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "protocol" / "libvirt-p2p-capture.json"


def replay(cap: dict, chunks: list[tuple[str, bytes]]) -> None:
    rule = functools.partial(incoming_domain_xml, disk_map={cap["a_images"]: cap["b_images"]},
                             expected_name=cap["name"], expected_uuid=cap["uuid"],
                             boot_dirs=(cap["boot_dir"],))
    f = RpcFilter(RpcPolicy(cap["name"], cap["uuid"], cap["migrate_uri"], cap["disks_uri"], rule))
    for side, data in chunks:
        f.client_data(data) if side == "client" else f.server_data(data)
        f.data_to_server()
        f.data_to_client()


def main() -> None:
    cap = json.loads(CAPTURE.read_text())
    chunks = [(side, bytes.fromhex(h)) for side, h in cap["log"]]
    total = sum(len(d) for _, d in chunks)
    replay(cap, chunks)
    n = 200
    t = time.perf_counter()
    for _ in range(n):
        replay(cap, chunks)
    per = (time.perf_counter() - t) / n
    print(f"one p2p migration's RPC ({len(chunks)} chunks, {total} B): {per * 1e3:.2f} ms of filter CPU")

    ping = encode_packet(Header(KEEPALIVE_PROGRAM, 1, KEEPALIVE_PING, MessageType.MESSAGE, 0, 0))
    f = RpcFilter(RpcPolicy(cap["name"], cap["uuid"], cap["migrate_uri"], cap["disks_uri"], str))
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        f.client_data(ping)
        f.data_to_server()
    print(f"keepalive PING through the filter: {(time.perf_counter() - t) / n * 1e6:.1f} us")


if __name__ == "__main__":
    main()

"""A TCP relay for the lab tests: forwards LISTEN -> TARGET and cuts the first connection once.

    python relay.py LISTEN_HOST:PORT TARGET_HOST:PORT CUT_AFTER_BYTES

After CUT_AFTER_BYTES bytes went from the client to the target on the first
connection, both sides of it are reset (as a broken WAN link would). Later
connections are relayed untouched. Prints one line per event on stdout.
"""
from __future__ import annotations

import socket
import struct
import sys
import threading


def _reset(sock: socket.socket) -> None:
    try:
        # SO_LINGER 0: close sends RST, as a broken link would, not a clean FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def pipe(src: socket.socket, dst: socket.socket, budget: list[int] | None, pair: list[socket.socket]) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                dst.shutdown(socket.SHUT_WR)
                return
            if budget is not None:
                budget[0] -= len(data)
                if budget[0] <= 0:
                    print("cut", flush=True)
                    for s in pair:
                        _reset(s)
                    return
            dst.sendall(data)
    except OSError:
        for s in pair:
            _reset(s)


def main() -> None:
    listen, target, cut_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((lhost, int(lport)))
    server.listen(8)
    print("listening", flush=True)
    first = True
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection((thost, int(tport)))
        pair = [client, upstream]
        budget = [cut_after] if first else None
        first = False
        print("connection", flush=True)
        threading.Thread(target=pipe, args=(client, upstream, budget, pair), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, client, None, pair), daemon=True).start()


if __name__ == "__main__":
    main()

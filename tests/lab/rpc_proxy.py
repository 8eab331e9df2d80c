"""Test helpers: unix-socket proxies for the lab (not part of migsec).

``FilterProxy`` listens on a unix socket and runs an ``RpcFilter`` between each client and a
real libvirtd socket; ``Forwarder`` is a plain unix -> unix byte pipe (QEMU's stream, NBD).
Both run in daemon threads of the test process; the lab's hosts reach the listening sockets
through their bind-mounted /run.
"""
from __future__ import annotations

import os
import selectors
import socket
import threading
from pathlib import Path

from migsec.errors import MigsecError
from migsec.protocol.libvirt_rpc import RpcFilter, RpcPolicy


def _listen(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    srv.listen(8)
    return srv


class _Server:
    def __init__(self, listen: Path) -> None:
        self.listen = listen
        self._srv = _listen(listen)
        self._closed = False
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True
        self._srv.close()
        self.listen.unlink(missing_ok=True)


class FilterProxy(_Server):
    """Every connection: client <-> RpcFilter(policy) <-> target libvirtd socket.

    ``events`` collects every filter event; ``log`` the raw chunks as ("client"|"server", bytes),
    in the order the filter saw them.
    """

    def __init__(self, listen: Path, target: Path, policy: RpcPolicy) -> None:
        self.target = target
        self.policy = policy
        self.events: list = []
        self.log: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        super().__init__(listen)

    def _serve(self, client: socket.socket) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(str(self.target))
        f = RpcFilter(self.policy)
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, "client")
        sel.register(server, selectors.EVENT_READ, "server")
        try:
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)
                    with self._lock:
                        self.log.append((key.data, data))
                    if key.data == "client":
                        events = f.client_data(data)
                    else:
                        events = f.server_data(data)
                    with self._lock:
                        self.events.extend(events)
                    server.sendall(f.data_to_server())
                    client.sendall(f.data_to_client())
                    if not data and key.data == "server" and f.close_answered:
                        # B hung up after CONNECT_CLOSE (the normal end): let A close first
                        sel.unregister(server)
                        continue
                    if not data:
                        return
        except (BrokenPipeError, ConnectionResetError):
            pass   # one side hung up while the other still had bytes for it
        except (OSError, MigsecError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            sel.close()
            client.close()
            server.close()


class Forwarder(_Server):
    """A plain unix -> unix forwarder; ``sent``/``received`` count bytes (all connections)."""

    def __init__(self, listen: Path, target: Path) -> None:
        self.target = target
        self.sent = 0
        self.received = 0
        super().__init__(listen)

    def _serve(self, client: socket.socket) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.connect(str(self.target))
        except OSError as exc:
            self.errors.append(f"connect {self.target}: {exc}")
            client.close()
            return

        def pump(src: socket.socket, dst: socket.socket, up: bool) -> None:
            try:
                while data := src.recv(1 << 20):
                    dst.sendall(data)
                    if up:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        back = threading.Thread(target=pump, args=(server, client, False), daemon=True)
        back.start()
        pump(client, server, True)
        back.join()
        client.close()
        server.close()

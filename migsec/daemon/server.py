"""migsecd's asyncio core: the local unix socket and the inter-domain TCP endpoint.

The control plane (local requests, the inter-domain handshake) runs on the
event loop; anything that blocks (libvirt, the bulk data plane, durable journal
writes) runs in threads. Components:

- authentication server (AS) and authorization server (AZ): ``migsec.auth``;
- inter-domain endpoint: ``migsec.daemon.endpoint`` (incoming: the handshake here, then
  ``migsec.migration.destination`` in a thread) and ``migsec.migration.source`` (outgoing,
  driven by the VMM agent);
- VMM agent: ``migsec.virt`` calls made from those threads.
"""
from __future__ import annotations

import asyncio
import grp
import logging
import os
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from migsec import virt
from migsec.daemon import handlers, wire
from migsec.daemon.notify import sd_notify
from migsec.errors import ConfigError, MalformedMessageError, MigsecError
from migsec.daemon.endpoint import serve_peer
from migsec.migration.live import sweep_run_dirs
from migsec.migration.recovery import auto_recover

if TYPE_CHECKING:
    from migsec.daemon.services import Services

log = logging.getLogger("migsecd")


class Daemon:
    """One migsecd: owns the sockets and dispatches to the components."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.config = services.config
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="migsecd")
        self._unix_server: asyncio.AbstractServer | None = None
        self._peer_socket: socket.socket | None = None
        self._peer_task: asyncio.Task | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self.active = threading.Semaphore(services.max_concurrent)

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = asyncio.Event()
        self._sweep_run_dirs()
        await self._start_unix()
        self._start_tcp()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        log.info(
            "%s listening on %s (peers) and %s (local clients)",
            self.services.did,
            self.services.listen_description,
            self.services.socket_path,
        )
        sd_notify("READY=1")
        unfinished = self._report_unfinished()
        threading.Thread(target=self._warm_libvirt, name="migsecd-warm", daemon=True).start()
        if unfinished and self.config.recovery.auto:
            # after the sockets listen: a peer recovering the same migration can reach us
            threading.Thread(target=self._auto_recover, name="migsecd-recover", daemon=True).start()

    def _sweep_run_dirs(self) -> None:
        def journaled(name: str) -> bool:  # only the run directories there are: not the whole journal
            try:
                self.services.journal.get(name)
            except MigsecError:  # not a migration of ours (or unreadable): left alone
                return False
            return True

        for mid in sweep_run_dirs(journaled):
            log.info("migration %s: removed its run directory (left by a daemon that stopped with it)", mid)

    def _auto_recover(self) -> None:
        try:
            auto_recover(self.services)
        except Exception:
            log.exception("automatic recovery failed; run `migsec recover`")

    def _warm_libvirt(self) -> None:
        """Let libvirtd probe QEMU's capabilities now, in the background: on a fresh host that
        probe (3-4 s) would otherwise fall inside the first incoming migration's downtime."""
        uri = self.config.libvirt.uri
        try:
            took = virt.warm_capabilities(uri)
        except MigsecError as exc:
            log.warning("warming libvirt's capabilities at %s failed (the first restore will probe them): %s",
                        uri, exc)
            return
        log.info("libvirt capabilities at %s ready (%.1f s)", uri, took)

    def _report_unfinished(self) -> int:
        """A restart after a crash: say which migrations a crash interrupted; returns how many."""
        try:
            unfinished = self.services.journal.list(active_only=True)
        except MigsecError as exc:
            log.error("cannot read the migration journal: %s", exc)
            return 0
        then = ("recovering it now ([recovery] auto)" if self.config.recovery.auto
                else "run `migsec recover` ([recovery] auto = false)")
        for entry in unfinished:
            log.warning("migration %s (%s of %s with %s) stopped in phase %s: %s",
                        entry.migration_id, entry.role, entry.data.get("domain"), entry.data.get("peer"),
                        entry.phase, then)
        return len(unfinished)

    async def run(self) -> None:
        await self.start()
        assert self._stopping is not None
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        sd_notify("STOPPING=1")
        log.info("shutting down")
        if self._peer_task is not None:
            self._peer_task.cancel()
        if self._peer_socket is not None:
            self._peer_socket.close()
        if self._unix_server is not None:
            self._unix_server.close()
        for task in list(self._tasks):
            task.cancel()
        try:
            os.unlink(self.services.socket_path)
        except FileNotFoundError:
            pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _reload(self) -> None:
        # running migrations keep the objects they already hold; new ones see the new ones
        try:
            self.services.reload()
        except MigsecError as exc:
            log.error("reload failed, keeping the previous policies and peers: %s", exc)
        else:
            log.info("reloaded policies and peers")

    async def _start_unix(self) -> None:
        path = self.services.socket_path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            if _unix_socket_alive(path):
                raise ConfigError(f"daemon.socket: another migsecd is listening on {path}")
            os.unlink(path)
        old_umask = os.umask(0o117)  # never world-accessible, not even for a moment
        try:
            self._unix_server = await asyncio.start_unix_server(self._local_client, path=path)
        finally:
            os.umask(old_umask)
        group = self.services.socket_group
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError as exc:
                raise ConfigError(f"daemon.socket_group: no group named {group!r}") from exc
            os.chown(path, -1, gid)
        os.chmod(path, self.services.socket_mode)

    def _start_tcp(self) -> None:
        host, port = self.services.listen
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, address = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(64)
        except OSError as exc:
            raise ConfigError(f"daemon.listen: cannot listen on {host}:{port}: {exc}") from exc
        sock.setblocking(False)
        self._peer_socket = sock
        self._peer_task = asyncio.get_running_loop().create_task(self._accept_peers(sock))

    async def _accept_peers(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, address = await loop.sock_accept(listener)
            conn.setblocking(False)
            self._spawn(serve_peer(self, conn, address))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- local clients ----------------------------------------------------------------
    async def _local_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer_credentials(writer)
        try:
            while True:
                try:
                    message = await wire.read_message(reader)
                except MigsecError as exc:
                    await _send(writer, wire.error_reply(exc))
                    return
                if message is None:
                    return
                await self._dispatch(message, writer, peer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, message: dict, writer: asyncio.StreamWriter, peer: str) -> None:
        op = message.get("op")
        handler = handlers.LOCAL_OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            await _send(writer, wire.error_reply(MalformedMessageError(f"unknown operation {op!r}")))
            return
        loop = asyncio.get_running_loop()

        def emit(event: dict) -> None:
            # called from worker threads: progress events for the client
            loop.call_soon_threadsafe(_write_nowait, writer, event)

        try:
            result = await loop.run_in_executor(self.executor, handler, self, message, emit)
        except MigsecError as exc:
            log.info("local %s from %s failed: %s", op, peer, exc)
            reply = wire.error_reply(exc)
        except Exception:
            log.exception("local %s from %s: internal error", op, peer)
            reply = wire.error_reply(RuntimeError())
        else:
            reply = {"ok": True, **result}
        await _send(writer, reply)


def _write_nowait(writer: asyncio.StreamWriter, message: dict) -> None:
    if not writer.is_closing():
        writer.write(wire.encode(message))


async def _send(writer: asyncio.StreamWriter, message: dict) -> None:
    if writer.is_closing():
        return
    writer.write(wire.encode(message))
    try:
        await writer.drain()
    except ConnectionError:
        pass


def _peer_credentials(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    try:
        import struct

        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        return f"pid={pid} uid={uid}"
    except (OSError, AttributeError):
        return "unknown"


def _unix_socket_alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True

"""Length-prefixed JSON messages between ``migsec`` and ``migsecd``.

A message is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON encoding one object. The same framing is used on the unix socket (asyncio
side in the daemon, blocking side in the client: ``LocalConnection``, found by
``socket_path``). Bytes fields travel as base64 text; helpers below convert.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from typing import Any, Iterator

from migsec.config import DEFAULT_CONTROL_SOCKET, config_path as resolve_config, load_config
from migsec.errors import (
    ConfigError,
    DaemonError,
    FrameTooLargeError,
    MalformedMessageError,
    MigrationFailed,
    MigsecError,
    ProtocolError,
)

MAX_MESSAGE = 4 * 1024 * 1024
_HEADER = struct.Struct(">I")


def encode(message: dict[str, Any]) -> bytes:
    """Frame one JSON object."""
    body = json.dumps(message, separators=(",", ":"), sort_keys=True).encode()
    if len(body) > MAX_MESSAGE:
        raise FrameTooLargeError(f"local message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """Decode one frame body into an object; anything else is MalformedMessageError."""
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessageError(f"local message is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise MalformedMessageError("local message is not a JSON object")
    return message


def _length(header: bytes) -> int:
    (length,) = _HEADER.unpack(header)
    if length > MAX_MESSAGE:
        raise FrameTooLargeError(f"local message announces {length} bytes (max {MAX_MESSAGE})")
    return length


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Read one message; None on a clean end of stream before a header."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("local connection closed inside a message header") from exc
        return None
    try:
        body = await reader.readexactly(_length(header))
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("local connection closed inside a message") from exc
    return decode(body)


def recv_message(sock: socket.socket) -> dict[str, Any] | None:
    """Blocking counterpart of read_message."""
    header = _recv_exactly(sock, _HEADER.size, allow_eof=True)
    if header is None:
        return None
    body = _recv_exactly(sock, _length(header), allow_eof=False)
    assert body is not None
    return decode(body)


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def _recv_exactly(sock: socket.socket, n: int, *, allow_eof: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if allow_eof and not buf:
                return None
            raise ProtocolError("connection closed in the middle of a message")
        buf += chunk
    return bytes(buf)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str) -> bytes:
    """Decode a base64 field, naming it when it is not valid."""
    if not isinstance(text, str):
        raise MalformedMessageError(f"field {what!r} must be base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise MalformedMessageError(f"field {what!r} is not valid base64") from exc


def error_reply(exc: BaseException) -> dict[str, Any]:
    """The reply that carries a MigsecError (or an unexpected one) to the client."""
    if isinstance(exc, MigsecError):
        reply: dict[str, Any] = {
            "ok": False,
            "error": type(exc).__name__,
            "message": str(exc) or type(exc).__name__,
            "exit_code": exc.exit_code,
        }
        for attr in ("where", "decision", "rolled_back"):
            if hasattr(exc, attr):
                reply[attr] = getattr(exc, attr)
        return reply
    return {"ok": False, "error": "InternalError", "message": "internal error in migsecd (see its log)", "exit_code": 1}


class LocalConnection:
    """A blocking connection to migsecd's unix socket."""

    def __init__(self, path: str, *, timeout: float | None = None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError as exc:
            raise ConfigError(f"migsecd is not running (no socket at {path})") from exc
        except PermissionError as exc:
            raise ConfigError(f"no permission to reach migsecd at {path} (root or the socket's group)") from exc
        except OSError as exc:
            raise ConfigError(f"cannot reach migsecd at {path}: {exc}") from exc

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its final reply (ignoring events)."""
        for reply in self.stream(message):
            if "event" not in reply:
                return reply
        raise ProtocolError("migsecd closed the connection without answering")

    def stream(self, message: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Send one request; yield its events, then the final reply; raise DaemonError on failure."""
        try:
            send_message(self.sock, message)
            while True:
                reply = recv_message(self.sock)
                if reply is None:
                    raise ProtocolError("migsecd closed the connection without answering (did it stop? "
                                        "`migsec jobs` shows where a migration got to, `migsec recover` "
                                        "finishes it)")
                if "event" in reply:
                    yield reply
                    continue
                if not reply.get("ok"):
                    raise DaemonError(reply)
                yield reply
                return
        except socket.timeout as exc:
            raise MigrationFailed("timed out waiting for migsecd") from exc
        except OSError as exc:
            raise ProtocolError(f"connection to migsecd failed: {exc}") from exc

    def __enter__(self) -> "LocalConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()


def socket_path(config_path: str | None) -> str:
    """The daemon socket: $MIGSEC_SOCKET, else ``[listen].control_socket`` of --config,
    $MIGSEC_CONFIG or /etc/migsec/migsecd.toml (when it exists), else the default."""
    if os.environ.get("MIGSEC_SOCKET") and not config_path:
        return os.environ["MIGSEC_SOCKET"]
    path = resolve_config(config_path)
    if config_path or os.environ.get("MIGSEC_CONFIG") or path.exists():
        return str(load_config(path, check_files=False).listen.control_socket)
    return DEFAULT_CONTROL_SOCKET

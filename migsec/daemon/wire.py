"""Length-prefixed JSON messages between ``migsec`` and ``migsecd``.

A message is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON encoding one object. The same framing is used on the unix socket (asyncio
side in the daemon, blocking side in the client). Bytes fields travel as
base64 text; helpers below convert.
"""
from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
from typing import Any

from migsec.errors import FrameTooLargeError, MalformedMessageError, ProtocolError

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
    from migsec.errors import MigsecError

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

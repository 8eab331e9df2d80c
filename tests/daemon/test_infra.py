"""migsecd's plumbing: local message framing, sd_notify, journald log format, progress."""
from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from migsec.daemon import wire
from migsec.daemon.logsetup import JournalFormatter
from migsec.daemon.notify import sd_notify
from migsec.errors import FrameTooLargeError, MalformedMessageError, ProtocolError


def test_wire_roundtrip_over_a_socketpair():
    a, b = socket.socketpair()
    with a, b:
        wire.send_message(a, {"op": "ping", "n": 1})
        wire.send_message(a, {"op": "jobs"})
        a.shutdown(socket.SHUT_WR)
        assert wire.recv_message(b) == {"op": "ping", "n": 1}
        assert wire.recv_message(b) == {"op": "jobs"}
        assert wire.recv_message(b) is None


def test_wire_refuses_oversized_and_non_object_messages():
    a, b = socket.socketpair()
    with a, b:
        a.sendall((wire.MAX_MESSAGE + 1).to_bytes(4, "big"))
        with pytest.raises(FrameTooLargeError):
            wire.recv_message(b)
    with pytest.raises(MalformedMessageError):
        wire.decode(b"[1, 2]")
    with pytest.raises(MalformedMessageError):
        wire.decode(b"\xff")


def test_wire_truncated_message_is_an_error():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(wire.encode({"op": "ping"})[:-2])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError):
            wire.recv_message(b)


def test_async_reader_matches_blocking_writer():
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(wire.encode({"op": "login", "request": "x"}))
        reader.feed_eof()
        first = await wire.read_message(reader)
        second = await wire.read_message(reader)
        return first, second

    assert asyncio.run(main()) == ({"op": "login", "request": "x"}, None)


def test_unb64_names_the_field():
    assert wire.unb64(wire.b64(b"\x00\x01"), "x") == b"\x00\x01"
    with pytest.raises(MalformedMessageError, match="'ticket'"):
        wire.unb64("not base64!", "ticket")


def test_sd_notify_sends_a_datagram(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": path})
        assert server.recv(100) == b"READY=1"
    assert not sd_notify("READY=1", environ={})


def test_journal_formatter_prefixes_every_line_with_the_priority():
    record = logging.LogRecord("migsecd", logging.WARNING, __file__, 1, "a\nb", None, None)
    assert JournalFormatter("%(message)s").format(record) == "<4>a\n<4>b"

"""Control messages on channel 0 of a keyed record-layer session over a blocking socket.

The bulk streams go through ``migsec.transfer.plane``; before and after them the
two daemons exchange small JSON control messages (receipt, decision, resumed,
abort) on channel 0 of the same record layer. Reads use the layer's sans-IO path,
so bytes the data plane already buffered inside the layer are not lost.
"""
from __future__ import annotations

import socket
import time
from typing import Any

from migsec.errors import PeerClosedError, PeerTimeoutError, UnexpectedMessageError, network_error
from migsec.protocol import Ack, Close, Control, NEED_DATA
from migsec.protocol.records import CONTROL_CHANNEL



class ControlLink:
    """``send_control(dict)`` / ``recv_control(timeout)`` over ``records`` on ``sock``."""

    def __init__(self, sock: socket.socket, records: Any, peer_name: str) -> None:
        self.sock = sock
        self.records = records
        self.peer_name = peer_name
        self.bytes_sent = 0

    def send_control(self, message: dict) -> None:
        frame = self.records.send_control(CONTROL_CHANNEL, message)
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            raise network_error(exc, f"sending to {self.peer_name} failed") from exc
        self.bytes_sent += len(frame)

    def recv_control(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            event = self.records.next_event()
            if event is NEED_DATA:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeoutError(f"no answer from {self.peer_name} within {timeout:.0f} s")
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(65536)
                except socket.timeout as exc:
                    raise PeerTimeoutError(f"no answer from {self.peer_name} within {timeout:.0f} s") from exc
                except OSError as exc:
                    raise network_error(exc, f"connection to {self.peer_name} failed") from exc
                if not data:
                    raise PeerClosedError(f"{self.peer_name} closed the connection")
                self.records.receive_data(data)
                continue
            if isinstance(event, Ack):
                continue
            if isinstance(event, Control):
                if event.channel != CONTROL_CHANNEL:
                    raise UnexpectedMessageError(f"control message on stream channel {event.channel}")
                return dict(event.message)
            if isinstance(event, Close):
                raise PeerClosedError(f"{self.peer_name} closed the session")
            raise UnexpectedMessageError(f"unexpected {type(event).__name__} from {self.peer_name}")

"""Failures across the data plane (real handshake keys, real loopback TCP): what each side
raises, and what the source learns of the destination's failure (a code, never its detail)."""
from __future__ import annotations

import errno
import socket

from migsec.errors import RESUMABLE, NetworkError, TransferError
from migsec.protocol import NEED_DATA, Control
from migsec.transfer import SourceDecision, as_control, receive_streams, send_streams
from migsec.transfer import sink as sink_mod
from transfer_helpers import Relay, Run, layers

from test_plane import expected, run_pair, sources


def test_a_disk_full_at_the_destination_is_final_and_the_source_learns_no_path(tmp_path, keys, sparse_image,
                                                                            monkeypatch):
    real_pwrite = sink_mod.os.pwrite
    written = [0]

    def pwrite(fd, data, offset):
        written[0] += len(data)
        if written[0] > 2 * 1024 * 1024:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(sink_mod.os, "pwrite", pwrite)
    sent, error, receiver = run_pair(keys, Relay(), sources(sparse_image), str(tmp_path / "stage"),
                                     expected(tmp_path))
    local = receiver.error
    # the destination's own error names the stream and the cause ...
    assert isinstance(local, TransferError) and "No space left on device" in str(local), local
    assert not isinstance(local, RESUMABLE)
    # ... the source learns only that it was an internal error there, and does not resume after it
    assert isinstance(error, TransferError) and not isinstance(error, RESUMABLE), error
    assert "internal error" in str(error) and "space" not in str(error) and "disk0" not in str(error)


def test_a_cut_connection_is_a_network_error_on_both_sides(tmp_path, keys, sparse_image):
    sent, error, receiver = run_pair(keys, Relay(cut_after=3 * 1024 * 1024), sources(sparse_image),
                                     str(tmp_path / "stage"), expected(tmp_path))
    assert isinstance(error, RESUMABLE), error
    assert isinstance(receiver.error, NetworkError), receiver.error  # B keeps its staging for the resume


def test_the_source_s_decision_mid_transfer_stops_the_destination_with_its_token(tmp_path, keys, sparse_image):
    # A gives up after its first stream and sends its signed abort (here any token: the plane
    # does not verify it, the commit machine does): B stops with that token, and tells A nothing
    a, b = layers(keys)
    src_sock, dst_sock = Relay().connect()

    def receive():
        with dst_sock:
            return receive_streams(dst_sock, b, str(tmp_path / "stage"), expected(tmp_path), timeout=30)

    receiver = Run(receive)
    receiver.start()

    class GaveUp(Exception):
        pass

    def progress(p):
        raise GaveUp()

    try:
        send_streams(src_sock, a, sources(sparse_image), progress=progress, timeout=30)
    except GaveUp:
        pass
    src_sock.sendall(a.send_control(0, as_control("decision", "head.body.sig")))
    src_sock.shutdown(socket.SHUT_WR)  # A waits for B to close, reading what B still sends
    told = []
    src_sock.settimeout(30)
    while data := src_sock.recv(65536):
        a.receive_data(data)
        while (event := a.next_event()) is not NEED_DATA:
            if isinstance(event, Control):
                told.append(event.message)
    src_sock.close()
    receiver.join(30)
    assert isinstance(receiver.error, SourceDecision) and receiver.error.token == "head.body.sig"
    assert [m for m in told if m.get("type") != "resume"] == []  # no error message to A

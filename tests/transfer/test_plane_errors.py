"""Failures across the data plane (real handshake keys, real loopback TCP): what each side
raises, and what the source learns of the destination's failure (a code, never its detail)."""
from __future__ import annotations

import errno

from migsec.errors import RESUMABLE, NetworkError, TransferError
from migsec.transfer import sink as sink_mod
from transfer_helpers import Relay

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

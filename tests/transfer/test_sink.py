"""Staged sinks: sparse writes, read-back verification, resume state, commit and discard."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migsec.errors import IntegrityError, ResumeError, TransferError, TruncatedStreamError
from migsec.transfer import BLOCK, Staging, StreamSource, StreamSpec, file_digest, iter_extents
from transfer_helpers import MiB, make_sparse


def feed(sink, source: StreamSource, start: int = 0, stop: int | None = None) -> None:
    """Copy a source's pieces into a sink locally (the data plane does this over the network)."""
    for kind, off, length, view in source.pieces(start):
        if stop is not None and off >= stop:
            return
        if kind == "data":
            sink.write(off, view)
        else:
            sink.hole(off, length)


def sha(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_stream_arrives_identical_and_sparse(tmp_path, sparse_image):
    target = str(tmp_path / "out.img")
    src = StreamSource(1, "disk0", "disk", path=sparse_image, target=target)
    staging = Staging.open(tmp_path / "stage", [src.spec])
    sink = staging.sink(1)
    feed(sink, src)
    digest, allocated = src.digest()
    sink.end(src.size, digest)
    staging.commit()
    staging.close()
    assert sha(target) == sha(sparse_image)
    assert os.path.getsize(target) == src.size
    # holes and the 2 MiB of written zeros stay unallocated at the destination
    assert os.stat(target).st_blocks * 512 <= allocated + 64 * 1024
    assert os.stat(target).st_blocks < os.stat(sparse_image).st_blocks
    assert not (tmp_path / "stage").exists()


def test_corrupted_byte_on_disk_before_end_is_caught(tmp_path, sparse_image):
    src = StreamSource(1, "disk0", "disk", path=sparse_image)
    staging = Staging.open(tmp_path / "stage", [src.spec])
    sink = staging.sink(1)
    feed(sink, src)
    with open(sink.path, "r+b") as fh:  # flip one byte of what was written
        fh.seek(20 * MiB + 5)
        byte = fh.read(1)
        fh.seek(20 * MiB + 5)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match="stream 'disk0'"):
        sink.end(src.size, src.digest()[0])
    staging.discard()
    assert not (tmp_path / "stage").exists()


def test_end_before_all_data_is_truncation(tmp_path):
    src = StreamSource(1, "xml", "xml", data=os.urandom(3 * BLOCK))
    staging = Staging.open(tmp_path / "stage", [src.spec])
    sink = staging.sink(1)
    feed(sink, src, stop=BLOCK)
    with pytest.raises(TruncatedStreamError, match="'xml'"):
        sink.end(src.size, src.digest()[0])
    staging.discard()


def test_wrong_offsets_and_overruns_are_refused(tmp_path):
    spec = StreamSpec(1, "disk0", "disk", 4 * BLOCK)
    staging = Staging.open(tmp_path / "stage", [spec])
    sink = staging.sink(1)
    with pytest.raises(ResumeError, match="expected 0"):
        sink.write(BLOCK, b"x" * BLOCK)
    sink.hole(0, 3 * BLOCK)
    with pytest.raises(TransferError, match="beyond size"):
        sink.write(3 * BLOCK, b"x" * (BLOCK + 1))
    staging.discard()


def test_resume_keeps_acked_prefix_and_cuts_the_rest(tmp_path, sparse_image):
    target = str(tmp_path / "out.img")
    src = StreamSource(1, "disk0", "disk", path=sparse_image, target=target)
    staging = Staging.open(tmp_path / "stage", [src.spec])
    sink = staging.sink(1)
    feed(sink, src, stop=2 * MiB)
    staging.checkpoint()
    acked = sink.acked
    feed(sink, src, start=acked, stop=24 * MiB)  # written but never acknowledged, then "crash"
    assert sink.frontier > 20 * MiB + MiB
    for s in staging.sinks.values():
        s.close()
    state = json.loads((tmp_path / "stage" / "state.json").read_text())
    assert state["streams"]["1"]["acked"] == acked > 0

    again = Staging.open(tmp_path / "stage", [src.spec])
    assert again.resume_offsets() == {"disk0": acked}
    sink2 = again.sink(1)
    with open(sink2.path, "rb") as fh:  # the unacknowledged region was cut back to a hole
        fh.seek(20 * MiB)
        assert fh.read(MiB) == bytes(MiB)
    feed(sink2, src, start=acked)
    sink2.end(src.size, src.digest()[0])
    again.commit()
    again.close()
    assert sha(target) == sha(sparse_image)


def test_resume_detects_a_prefix_changed_while_disconnected(tmp_path, sparse_image):
    src = StreamSource(1, "disk0", "disk", path=sparse_image)
    staging = Staging.open(tmp_path / "stage", [src.spec])
    sink = staging.sink(1)
    feed(sink, src, stop=2 * MiB)
    staging.checkpoint()
    acked = sink.acked
    sink.close()
    with open(sink.path, "r+b") as fh:
        fh.write(b"\x00\x01")
    again = Staging.open(tmp_path / "stage")
    feed(again.sink(1), src, start=acked)
    with pytest.raises(IntegrityError):
        again.sink(1).end(src.size, src.digest()[0])
    again.discard()


def test_resume_with_a_different_stream_is_refused(tmp_path):
    staging = Staging.open(tmp_path / "stage", [StreamSpec(1, "disk0", "disk", MiB)])
    staging.sink(1).close()
    with pytest.raises(ResumeError, match="differs"):
        Staging.open(tmp_path / "stage", [StreamSpec(1, "disk0", "disk", 2 * MiB)])


def test_existing_target_is_never_adopted(tmp_path):
    target = tmp_path / "precious.img"
    target.write_bytes(b"keep me")
    with pytest.raises(TransferError, match="already exists"):
        Staging.open(tmp_path / "stage", [StreamSpec(1, "disk0", "disk", MiB, str(target))])
    assert target.read_bytes() == b"keep me"


def test_discard_after_commit_removes_installed_files_too(tmp_path):
    data = os.urandom(BLOCK + 10)
    target = tmp_path / "t" / "disk.img"
    target.parent.mkdir()
    src = StreamSource(1, "disk0", "disk", data=data, target=str(target))
    staging = Staging.open(tmp_path / "stage", [src.spec])
    feed(staging.sink(1), src)
    staging.sink(1).end(src.size, src.digest()[0])
    staging.commit()
    assert target.read_bytes() == data
    assert file_digest(target) == src.digest()[0]
    Staging.open(tmp_path / "stage").discard()
    assert not target.exists() and not (tmp_path / "stage").exists()
    assert list((tmp_path / "t").iterdir()) == []


@pytest.fixture
def other_fs(tmp_path):
    """A directory on another file system than ``tmp_path`` (/dev/shm is a tmpfs)."""
    import shutil
    import tempfile

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (/dev/shm) next to the temporary directory")
    d = tempfile.mkdtemp(prefix="migsec-xdev-", dir="/dev/shm")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_commit_across_file_systems_stages_beside_the_target(tmp_path, other_fs):
    data = os.urandom(3 * BLOCK + 7)
    target = os.path.join(other_fs, "vm2.qcow2")
    stage = tmp_path / "in-m1"
    assert os.stat(other_fs).st_dev != os.stat(tmp_path).st_dev
    src = StreamSource(2, "disk0", "disk", data=data, target=target)
    staging = Staging.open(stage, [src.spec, StreamSpec(3, "memory", "memory", BLOCK)])
    part = staging.sink(2).path
    assert os.path.dirname(part) == other_fs and os.stat(part).st_mode & 0o077 == 0
    assert os.path.dirname(staging.sink(3).path) == str(stage)  # no target: stays in staging
    feed(staging.sink(2), src)
    staging.sink(2).end(src.size, src.digest()[0])
    memory = StreamSource(3, "memory", "memory", data=os.urandom(BLOCK))
    feed(staging.sink(3), memory)
    staging.sink(3).end(BLOCK, memory.digest()[0])
    staging.commit()
    staging.close()
    assert file_digest(target) == src.digest()[0]
    assert os.listdir(other_fs) == ["vm2.qcow2"] and not stage.exists()


def test_resume_and_discard_find_the_part_beside_the_target(tmp_path, other_fs):
    data = os.urandom(4 * BLOCK)
    target = os.path.join(other_fs, "disk.img")
    src = StreamSource(2, "disk0", "disk", data=data, target=target)
    staging = Staging.open(tmp_path / "in-m2", [src.spec])
    feed(staging.sink(2), src, stop=2 * BLOCK)
    staging.checkpoint()
    part = staging.sink(2).path
    staging.sink(2).close()
    again = Staging.open(tmp_path / "in-m2")  # a restarted daemon reopens it from state.json
    assert again.sink(2).path == part and again.resume_offsets() == {"disk0": 2 * BLOCK}
    again.discard()
    assert os.listdir(other_fs) == [] and not (tmp_path / "in-m2").exists()


def test_commit_refuses_incomplete_streams(tmp_path):
    staging = Staging.open(tmp_path / "stage", [StreamSpec(1, "disk0", "disk", MiB, str(tmp_path / "x"))])
    with pytest.raises(TransferError, match="incomplete"):
        staging.commit()
    staging.discard()
    assert not (tmp_path / "x").exists()


def test_part_files_are_private(tmp_path):
    staging = Staging.open(tmp_path / "stage", [StreamSpec(1, "memory", "memory", MiB)])
    assert os.stat(staging.sink(1).path).st_mode & 0o077 == 0
    assert os.stat(tmp_path / "stage").st_mode & 0o077 == 0
    staging.discard()


@pytest.mark.parametrize("bad", [
    dict(channel=0), dict(channel=70000), dict(name="../etc/passwd"), dict(name=""),
    dict(kind="kernel"), dict(size=-1),
])
def test_stream_spec_validates(bad):
    fields = dict(channel=1, name="disk0", kind="disk", size=10) | bad
    with pytest.raises(TransferError):
        StreamSpec(**fields)


def test_source_refuses_unaligned_resume(sparse_image):
    src = StreamSource(1, "disk0", "disk", path=sparse_image)
    with pytest.raises(TransferError, match="cannot resume at offset 100"):
        list(src.pieces(100))


def test_source_refuses_a_directory_with_a_clear_error(tmp_path):
    with pytest.raises(TransferError, match="not a regular file or block device"):
        StreamSource(1, "disk0", "disk", path=str(tmp_path))


def test_inconsistent_state_file_is_a_resume_error(tmp_path):
    staging = Staging.open(tmp_path / "stage", [StreamSpec(1, "disk0", "disk", MiB)])
    staging.sink(1).close()
    state = json.loads((tmp_path / "stage" / "state.json").read_text())
    state["streams"]["1"]["acked"] = 2 * MiB
    (tmp_path / "stage" / "state.json").write_text(json.dumps(state))
    with pytest.raises(ResumeError, match="inconsistent"):
        Staging.open(tmp_path / "stage")
    (tmp_path / "stage" / "state.json").write_text("{not json")
    with pytest.raises(ResumeError, match="unreadable"):
        Staging.open(tmp_path / "stage")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 3 * MiB),
       writes=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 200_000), st.booleans()), max_size=6))
def test_any_sparse_layout_arrives_identical(tmp_path_factory, size, writes):
    """Random layouts (unaligned runs, written zeros, data at the end) survive source -> sink."""
    d = tmp_path_factory.mktemp("layout")
    layout = [(int(pos * (size - 1)), bytes(n) if zero else os.urandom(n)) for pos, n, zero in writes]
    layout = [(off, data[:size - off]) for off, data in layout]
    path = make_sparse(str(d / "src"), size, layout)
    src = StreamSource(1, "disk0", "disk", path=path, target=str(d / "out"))
    staging = Staging.open(d / "stage", [src.spec])
    feed(staging.sink(1), src)
    digest, allocated = src.digest()
    staging.sink(1).end(src.size, digest)
    staging.commit()
    staging.close()
    assert sha(d / "out") == sha(path)
    assert file_digest(d / "out") == digest == file_digest(path)
    nonzero_blocks = sum(1 for e in iter_extents(path) if e.kind == "data")
    assert allocated <= size and (allocated == 0) == (nonzero_blocks == 0)

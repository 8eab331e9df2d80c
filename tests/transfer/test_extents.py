"""Sparse extents and the canonical stream digest."""
from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migsec.errors import TransferError
from migsec.transfer import BLOCK, StreamDigest, bytes_digest, file_digest, iter_extents
from transfer_helpers import MiB, make_sparse


def test_extents_follow_data_holes_and_written_zeros(tmp_path):
    data = os.urandom(BLOCK * 3)
    path = make_sparse(str(tmp_path / "img"), 16 * MiB, [
        (MiB, data),
        (4 * MiB, bytes(2 * MiB)),      # allocated but zero: a hole for migsec
        (10 * MiB + 10, b"x"),          # one byte inside a block makes the block data
    ])
    extents = list(iter_extents(path))
    assert [(e.kind, e.offset, e.length) for e in extents] == [
        ("hole", 0, MiB),
        ("data", MiB, 3 * BLOCK),
        ("hole", MiB + 3 * BLOCK, 9 * MiB - 3 * BLOCK),
        ("data", 10 * MiB, BLOCK),
        ("hole", 10 * MiB + BLOCK, 6 * MiB - BLOCK),
    ]
    assert sum(e.length for e in extents) == os.path.getsize(path)


def test_extents_of_unaligned_file_end(tmp_path):
    path = make_sparse(str(tmp_path / "img"), BLOCK * 2 + 100, [(BLOCK * 2 + 50, b"y")])
    assert [(e.kind, e.length) for e in iter_extents(path)] == [("hole", 2 * BLOCK), ("data", 100)]


def test_digest_ignores_how_zeros_are_stored(tmp_path):
    payload = os.urandom(MiB)
    holes = make_sparse(str(tmp_path / "holes"), 8 * MiB, [(2 * MiB, payload)])
    with open(tmp_path / "dense", "wb") as fh:  # same content, every zero written
        fh.write(bytes(2 * MiB) + payload + bytes(5 * MiB))
    assert os.stat(holes).st_blocks < os.stat(tmp_path / "dense").st_blocks
    content = open(holes, "rb").read()
    assert file_digest(holes) == file_digest(tmp_path / "dense") == bytes_digest(content)


def test_digest_sees_every_byte_and_the_size(tmp_path):
    base = bytearray(os.urandom(3 * BLOCK))
    d0 = bytes_digest(bytes(base))
    for pos in (0, BLOCK + 7, len(base) - 1):
        changed = bytearray(base)
        changed[pos] ^= 1
        assert bytes_digest(bytes(changed)) != d0
    # trailing zeros change the size, so they change the digest
    assert bytes_digest(bytes(base) + bytes(10)) != d0
    assert bytes_digest(bytes(BLOCK)) != bytes_digest(bytes(2 * BLOCK))


def test_digest_is_not_plain_sha256_of_the_content():
    data = os.urandom(1000)
    assert bytes_digest(data) != hashlib.sha256(data).hexdigest()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["z", "r"]), st.integers(1, 3 * BLOCK)), min_size=1, max_size=6),
       st.sampled_from([BLOCK, 2 * BLOCK, 16 * BLOCK]))
def test_digest_does_not_depend_on_chunking(parts, chunk):
    data = b"".join(bytes(n) if kind == "z" else os.urandom(n) for kind, n in parts)
    digest = StreamDigest()
    for off in range(0, len(data), chunk):
        piece = data[off:off + chunk]
        # feed block by block classification at this chunking
        for b in range(0, len(piece), BLOCK):
            block = piece[b:b + BLOCK]
            if any(block):
                digest.data(off + b, block)
            else:
                digest.hole(off + b, len(block))
    assert digest.hexdigest() == bytes_digest(data)


def test_digest_refuses_out_of_order_feeding():
    digest = StreamDigest()
    digest.data(0, os.urandom(BLOCK))
    with pytest.raises(TransferError, match="expected 65536"):
        digest.hole(2 * BLOCK, BLOCK)
    digest.data(BLOCK, b"short")
    with pytest.raises(TransferError):
        digest.data(BLOCK + 5, os.urandom(BLOCK))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TransferError, match="cannot open"):
        list(iter_extents(tmp_path / "nope"))

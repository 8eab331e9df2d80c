"""The manifest's canonical form and its strict decoder."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migsec.errors import MalformedMessageError
from migsec.transfer import Manifest, ManifestEntry

ENTRY = dict(channel=2, name="disk0", kind="disk", size=1 << 30, allocated=300 << 20, digest="ab" * 32,
             target="/var/lib/images/vm1.img")


def manifest() -> Manifest:
    return Manifest("mig-1", (ManifestEntry(1, "domain.xml", "xml", 10, 10, "cd" * 32), ManifestEntry(**ENTRY)))


def test_round_trip_and_canonical_bytes():
    m = manifest()
    raw = m.to_json()
    assert Manifest.from_json(raw) == m
    assert Manifest.from_json(raw).to_json() == raw
    assert b" " not in raw.replace(b"domain.xml", b"")  # compact, sorted: one byte form to sign
    assert list(json.loads(raw)) == sorted(json.loads(raw))


def mutate(**changes) -> bytes:
    obj = json.loads(manifest().to_json())
    for path, value in changes.items():
        if path.startswith("s_"):
            obj["streams"][1][path[2:]] = value
        else:
            obj[path] = value
    return json.dumps(obj).encode()


@pytest.mark.parametrize("raw, why", [
    (mutate(version=2), "unsupported"),
    (mutate(block=4096), "unsupported"),
    (mutate(extra=1), "fields"),
    (mutate(s_size=1.5), "not a byte count|integer"),
    (mutate(s_allocated=(1 << 30) + 1), "allocated"),
    (mutate(s_digest="zz" * 32), "hex"),
    (mutate(s_name="domain.xml"), "twice"),
    (mutate(s_kind="kernel"), "kind"),
    (mutate(s_name="../../etc/shadow"), "plain name"),
    (b'{"version":1,"version":1}', "duplicate"),
    (b"[1,2]", "object"),
])
def test_decoder_refuses(raw, why):
    with pytest.raises(MalformedMessageError, match=why):
        Manifest.from_json(raw)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_never_fails_otherwise(raw):
    try:
        Manifest.from_json(raw)
    except MalformedMessageError:
        pass

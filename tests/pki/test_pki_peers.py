"""PeerDirectory: add/get/list/remove, fingerprint pins, refusals, corrupt files."""
from __future__ import annotations

import json

import pytest

from migsec.errors import ConfigError, DidMismatchError
from migsec.pki import PeerDirectory, PinMismatchError, UnknownPeerError
from migsec.pki.identity import DomainIdentity


@pytest.fixture()
def ident_b(domain_b) -> DomainIdentity:
    out, _ = domain_b
    return DomainIdentity.load(out / "domain-key.pem", out / "domain-cert.pem")


def test_add_get_list_remove(tmp_path, ident_b):
    d = PeerDirectory(tmp_path / "peers.json")
    assert d.list() == []
    p = d.add("cloud-b.example", "cloud-b.example", cert_pem=ident_b.cert_pem)
    assert p.address == "migsec://cloud-b.example:7443" and p.fingerprint == ident_b.fingerprint
    d.add("cloud-c.example", "migsec://198.18.0.3:9000", fingerprint="SHA256:" + "AB" * 32)
    again = PeerDirectory(tmp_path / "peers.json")  # read back from disk
    assert [x.did for x in again.list()] == ["cloud-b.example", "cloud-c.example"]
    assert again.get("cloud-b.example").cert_pem == ident_b.cert_pem
    assert again.get("cloud-c.example").fingerprint == "SHA256:" + "ab" * 32
    assert again.get("cloud-c.example").cert_pem is None
    with pytest.raises(ConfigError, match="already exists"):
        again.add("cloud-c.example", "x.example", fingerprint="SHA256:" + "00" * 32)
    again.remove("cloud-c.example")
    with pytest.raises(UnknownPeerError, match="cloud-c.example"):
        d.get("cloud-c.example")
    with pytest.raises(UnknownPeerError):
        d.remove("cloud-c.example")


def test_pinned_first_contact(tmp_path, ident_b):
    d = PeerDirectory(tmp_path / "peers.json")
    d.add("cloud-b.example", "[2001:db8::2]:7443", fingerprint=ident_b.fingerprint.upper().replace("SHA256:", "sha256:"))
    assert d.get("cloud-b.example").address == "migsec://[2001:db8::2]:7443"
    assert d.pin("cloud-b.example", ident_b.cert_pem).cert_pem == ident_b.cert_pem
    assert PeerDirectory(tmp_path / "peers.json").get("cloud-b.example").cert_pem == ident_b.cert_pem


def test_pin_mismatch_and_did_mismatch(tmp_path, ca, ident_b, now):
    d = PeerDirectory(tmp_path / "peers.json")
    d.add("cloud-b.example", "b.example", fingerprint="SHA256:" + "11" * 32)
    with pytest.raises(PinMismatchError, match="pinned is SHA256:1111"):
        d.pin("cloud-b.example", ident_b.cert_pem)
    assert d.get("cloud-b.example").cert_pem is None  # nothing stored
    with pytest.raises(PinMismatchError):
        d.add("cloud-b.example", "q.example", cert_pem=ident_b.cert_pem, fingerprint="SHA256:" + "22" * 32, replace=True)
    with pytest.raises(DidMismatchError, match="not 'cloud-q.example'"):
        d.add("cloud-q.example", "q.example", cert_pem=ident_b.cert_pem)


@pytest.mark.parametrize("kwargs, match", [
    ({"address": "http://b.example"}, "migsec://host:port"),
    ({"address": "b.example:99999"}, "invalid"),
    ({"fingerprint": "MD5:abc"}, "SHA256:<64 hex"),
    ({"fingerprint": "SHA256:1234"}, "SHA256:<64 hex"),
    ({"fingerprint": None}, "certificate or a SHA256 fingerprint"),
])
def test_bad_input(tmp_path, kwargs, match):
    args = {"address": "b.example", "fingerprint": "SHA256:" + "00" * 32, **kwargs}
    with pytest.raises(ConfigError, match=match):
        PeerDirectory(tmp_path / "p.json").add("cloud-b.example", args["address"], fingerprint=args["fingerprint"])


def test_corrupt_file(tmp_path):
    path = tmp_path / "peers.json"
    for content in ["{not json", json.dumps({"version": 2, "peers": {}}),
                    json.dumps({"version": 1, "peers": {"BAD DID": {"address": "a.example"}}}),
                    json.dumps({"version": 1, "peers": {"a.example": {}}})]:
        path.write_text(content)
        with pytest.raises(ConfigError, match="corrupt|invalid domain id"):
            PeerDirectory(path).list()

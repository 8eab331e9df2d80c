"""hooks/qemu run as libvirtd runs it: argv, XML on stdin, minimal environment, exit code."""
from __future__ import annotations

import json

import pytest
from lxml import etree

from migsec.audit import Ledger
from migsec.errors import MappingError
from migsec.hooks.mapping import map_restore_xml

from hook_helpers import UUID, domain_xml, entries, run_hook


# --- migrate begin ------------------------------------------------------------------------
def test_native_migration_is_refused_and_the_refusal_is_audited(site):
    r = run_hook(site.config, "vm1", "migrate", "begin", "-", stdin=domain_xml("/src/images/vm1.qcow2"))
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "incoming libvirt migration of domain 'vm1' refused" in err
    assert "migsec migrate" in err and "allow_native_migration" in err
    assert r.stdout == b""
    kinds = entries(site)
    assert kinds[-1] == ("native-migration-refused",
                         {"domain": "vm1", "uuid": UUID, "source": "libvirt-hook"})
    report = Ledger(site.ledger).verify(site.trust)  # signed by the domain's own key
    assert report.entries == 2 and report.signers == (site.did,)


def test_native_migration_allowed_by_config_passes_and_is_audited(site):
    site.write_config(hooks="allow_native_migration = true")
    r = run_hook(site.config, "vm1", "migrate", "begin", "-", stdin=domain_xml("/src/images/vm1.qcow2"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""  # empty output: libvirt keeps its XML
    assert entries(site)[-1][0] == "native-migration-allowed"


def test_native_migration_refused_when_the_config_is_broken(site):
    site.config.write_text("[domain]\nid = 'Not A DID'\n")
    r = run_hook(site.config, "vm1", "migrate", "begin", "-", stdin=domain_xml("/x"))
    assert r.returncode != 0
    assert "cannot read the migsec configuration" in r.stderr.decode()
    assert "[domain].id" in r.stderr.decode()


def test_native_migration_refused_without_any_config(tmp_path):
    r = run_hook(tmp_path / "absent.toml", "vm1", "migrate", "begin", "-", stdin=domain_xml("/x"))
    assert r.returncode != 0 and "configuration file not found" in r.stderr.decode()


def test_refusal_stands_when_it_cannot_be_audited(site):
    (site.root / "pki" / "domain-key.pem").chmod(0o644)  # the identity refuses to load
    r = run_hook(site.config, "vm1", "migrate", "begin", "-", stdin=domain_xml("/x"))
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "refused" in err and "could not be audited" in err
    assert not site.ledger.exists()


# --- restore begin ------------------------------------------------------------------------
def test_restore_of_a_foreign_image_maps_storage_and_networks(site):
    images = site.root / "images"
    (images / "vm1.qcow2").write_bytes(b"")
    (images / "base.qcow2").write_bytes(b"")
    xml = domain_xml("/src/images/vm1.qcow2", backing="/src/images/base.qcow2", bridge="br0",
                     kernel="/boot/vmlinuz-test")
    r = run_hook(site.config, "vm1", "restore", "begin", "-", stdin=xml)
    assert r.returncode == 0, r.stderr
    out = etree.fromstring(r.stdout)
    sources = [s.get("file") for s in out.iter("source") if s.get("file")]
    assert sources == [str(images / "vm1.qcow2"), str(images / "base.qcow2")]
    net = out.find("devices/interface[@type='network']/source")
    assert net.get("network") == "migsec-net" and net.get("portid") is None and net.get("bridge") is None
    assert out.find("devices/interface[@type='bridge']/source").get("bridge") == "br1"
    assert out.findtext("os/kernel") == "/boot/vmlinuz-test"  # not covered by the map: kept
    # what libvirt's ABI check compares is untouched
    before = etree.fromstring(xml)
    for path in ("uuid", "memory", "os/type", "devices/disk/target", "devices/interface/mac"):
        assert etree.tostring(out.find(path)) == etree.tostring(before.find(path))
    assert out.find("metadata")[0].tag == "{https://migsec.example/xmlns/1}tags"
    assert entries(site)[-1] == ("foreign-restore", {"domain": "vm1", "uuid": UUID, "source": "libvirt-hook"})


def test_foreign_restore_is_refused_when_it_cannot_be_audited(site):
    (site.root / "images" / "vm1.qcow2").write_bytes(b"")
    (site.root / "pki" / "domain-key.pem").chmod(0o644)  # the identity refuses to load
    r = run_hook(site.config, "vm1", "restore", "begin", "-", stdin=domain_xml("/src/images/vm1.qcow2"))
    assert r.returncode != 0 and r.stdout == b""
    assert "comes from another host and could not be audited" in r.stderr.decode()


def test_restore_of_a_local_image_prints_nothing(site):
    disk = site.root / "images" / "local.qcow2"
    disk.write_bytes(b"")
    r = run_hook(site.config, "vm1", "restore", "begin", "-", stdin=domain_xml(str(disk)))
    assert r.returncode == 0 and r.stdout == b"" and r.stderr == b""
    assert not site.ledger.exists()


def test_restore_with_a_path_outside_the_map_is_left_to_libvirt(site):
    r = run_hook(site.config, "vm1", "restore", "begin", "-", stdin=domain_xml("/elsewhere/vm1.qcow2"))
    assert r.returncode == 0 and r.stdout == b""


@pytest.mark.parametrize("xml, problem", [
    (b"<?xml version='1.0'?><!DOCTYPE d [<!ENTITY x 'y'>]><domain><name>&x;</name></domain>", "DOCTYPE"),
    (b"<domain><name>vm1</name", "not well-formed"),
    (b"<network/>", "expected a <domain>"),
])
def test_restore_refuses_bad_xml(site, xml, problem):
    r = run_hook(site.config, "vm1", "restore", "begin", "-", stdin=xml)
    assert r.returncode != 0
    assert "restore of domain 'vm1' refused" in r.stderr.decode() and problem in r.stderr.decode()


def test_restore_refused_when_the_config_is_unreadable(site):
    site.config.write_text("[storage\n")
    r = run_hook(site.config, "vm1", "restore", "begin", "-", stdin=domain_xml("/src/images/vm1.qcow2"))
    assert r.returncode != 0 and "invalid TOML" in r.stderr.decode()


def test_mapping_refuses_dot_dot_in_a_foreign_path(tmp_path):
    with pytest.raises(MappingError, match=r"'\.\.'"):
        map_restore_xml(domain_xml("/src/images/../../etc/shadow"), storage_map={"/src/images": "/dst"})


def test_mapping_keeps_paths_that_exist_here_even_under_a_mapped_directory(tmp_path):
    # a managed-save restore of a local VM whose disks sit in a directory that is also a map key
    local = tmp_path / "images"
    local.mkdir()
    (local / "vm1.qcow2").write_bytes(b"")
    xml = domain_xml(str(local / "vm1.qcow2"))
    assert map_restore_xml(xml, storage_map={str(local): "/srv/other"},
                           network_map={"default": "other"}) is None


# --- start begin: a definition migsec gave away ------------------------------------------------
MOVED = ('<migsec-moved:moved xmlns:migsec-moved="https://migsec.example/xmlns/1/moved" '
         'migration="m-42" destination="cloud-b.example" at="2026-12-03T09:00:00Z"/>')


def moved_xml() -> bytes:
    return domain_xml("/x").replace(b"</metadata>", MOVED.encode() + b"</metadata>")


def test_start_of_a_definition_given_away_is_refused_with_the_release_command(site):
    r = run_hook(site.config, "vm1", "start", "begin", "-", stdin=moved_xml())
    assert r.returncode != 0 and r.stdout == b""
    err = r.stderr.decode()
    assert "start of domain 'vm1' refused: migsec migrated it to cloud-b.example (migration m-42" in err
    assert "`migsec release vm1`" in err
    assert entries(site)[-1] == ("start-refused-moved", {
        "domain": "vm1", "uuid": UUID, "migration": "m-42", "destination": "cloud-b.example",
        "source": "libvirt-hook"})


def test_start_refusal_stands_without_a_config(tmp_path):
    r = run_hook(tmp_path / "absent.toml", "vm1", "start", "begin", "-", stdin=moved_xml())
    assert r.returncode != 0
    assert "`migsec release vm1`" in r.stderr.decode() and "not audited" in r.stderr.decode()


def test_the_namespace_in_a_comment_is_not_a_mark(site):
    xml = domain_xml("/x").replace(b"<memory", b"<!-- https://migsec.example/xmlns/1/moved --><memory")
    r = run_hook(site.config, "vm1", "start", "begin", "-", stdin=xml)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


# --- lifecycle and the rest ---------------------------------------------------------------------
def test_lifecycle_phases_append_signed_records(site):
    xml = domain_xml("/x")
    for args in (("started", "begin", "-"), ("stopped", "end", "-"), ("release", "end", "shutdown")):
        r = run_hook(site.config, "vm1", *args, stdin=xml)
        assert r.returncode == 0 and r.stdout == b"" and r.stderr == b"", r.stderr
    got = entries(site)
    assert [k for k, _ in got] == ["ledger-signer", "vm-started", "vm-stopped", "vm-released"]
    assert got[3][1] == {"domain": "vm1", "uuid": UUID, "reason": "shutdown", "source": "libvirt-hook"}
    assert Ledger(site.ledger).verify(site.trust).entries == 4


def test_stop_after_libvirts_own_migration_out_has_its_own_kind(site):
    # libvirt >= 10.5 passes the reason; 9.0 passes "-" (see test_lifecycle_phases_append_signed_records)
    r = run_hook(site.config, "vm1", "stopped", "end", "migrated", stdin=domain_xml("/x"))
    assert r.returncode == 0, r.stderr
    assert entries(site)[-1] == ("native-migration-out", {"domain": "vm1", "uuid": UUID, "reason": "migrated",
                                                          "source": "libvirt-hook"})


def test_other_phases_do_nothing(site):
    for args in (("prepare", "begin", "-"), ("start", "begin", "-"), ("reconnect", "begin", "-"),
                 ("attach", "begin", "-")):
        r = run_hook(site.config, "vm1", *args, stdin=domain_xml("/x"))
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert not site.ledger.exists()


def test_lifecycle_audit_failure_warns_but_does_not_stop_the_vm(tmp_path):
    r = run_hook(tmp_path / "absent.toml", "vm1", "started", "begin", "-", stdin=domain_xml("/x"))
    assert r.returncode == 0
    assert "warning: vm-started of domain 'vm1' not audited" in r.stderr.decode()


@pytest.mark.parametrize("argv", [(), ("vm1",), ("vm1", "migrate"), ("vm1", "a", "b", "c", "d")])
def test_wrong_arguments_are_an_error(site, argv):
    r = run_hook(site.config, *argv)
    assert r.returncode != 0 and "usage: 50-migsec" in r.stderr.decode()


def test_concurrent_hooks_keep_the_ledger_chain(site):
    import subprocess
    import sys

    from hook_helpers import HOOK

    env = {"PATH": "/usr/bin:/bin", "MIGSEC_CONFIG": str(site.config)}
    procs = [subprocess.Popen([sys.executable, str(HOOK), f"vm{i}", "started", "begin", "-"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for i in range(4)]
    for p in procs:
        out, err = p.communicate(domain_xml("/x"), timeout=60)
        assert p.returncode == 0, err
    report = Ledger(site.ledger).verify(site.trust)
    assert report.entries == 5  # the flock serialises writers: one signer entry, then 4 records
    started = sorted(b["domain"] for k, b in entries(site) if k == "vm-started")
    assert started == ["vm0", "vm1", "vm2", "vm3"]
    assert json.loads(site.ledger.read_text().splitlines()[-1])["kind"] == "vm-started"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(_names, min_size=1, max_size=3), here=st.booleans())
def test_mapping_moves_only_missing_paths_under_a_source(parts, here):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:  # fresh per example: no file left by another
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        rel = "/".join(parts)
        disk = src / rel
        if here:  # the file exists on this host: a local restore, never rewritten
            disk.parent.mkdir(parents=True, exist_ok=True)
            disk.touch()
        out = map_restore_xml(domain_xml(str(disk)), storage_map={str(src): str(dst)})
        if here:
            assert out is None
        else:
            assert etree.fromstring(out.encode()).find("devices/disk/source").get("file") == str(dst / rel)

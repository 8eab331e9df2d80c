"""The ``migrate begin`` hook admits migsec's own live migration by a one-time permit, nothing else."""
from __future__ import annotations

import os
import time

from migsec.audit import Ledger
from migsec.config import load_config
from migsec.hooks.permit import PermitError, check_and_consume, write_permit

from hook_helpers import UUID, domain_xml, entries, run_hook

import pytest


def permits(site):
    return load_config(site.config, check_files=False).paths.state_dir / "permits"


def test_a_permit_admits_one_incoming_migration_of_that_domain_once(site):
    write_permit(permits(site), migration_id="m1", uuid=UUID, name="vm1", ttl=60)
    r = run_hook(site.config, "vm1", "migrate", "begin", "-", stdin=domain_xml("/src/images/vm1.qcow2"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""  # the XML is left as B's filter already rewrote it
    kind, body = entries(site)[-1]
    assert kind == "live-migration-admitted" and body["migration_id"] == "m1" and body["uuid"] == UUID
    assert not list(permits(site).iterdir())  # consumed
    # the same migration again (a replayed native migration) is refused like any other
    r = run_hook(site.config, "vm1", "migrate", "begin", "-", stdin=domain_xml("/src/images/vm1.qcow2"))
    assert r.returncode != 0 and b"refused" in r.stderr
    assert entries(site)[-1][0] == "native-migration-refused"
    Ledger(site.ledger).verify(site.trust)


def test_a_permit_for_another_name_or_an_expired_one_admits_nothing(site):
    write_permit(permits(site), migration_id="m1", uuid=UUID, name="other", ttl=60)
    r = run_hook(site.config, "vm1", "migrate", "begin", "-", stdin=domain_xml("/src/images/vm1.qcow2"))
    assert r.returncode != 0
    write_permit(permits(site), migration_id="m2", uuid=UUID, name="vm1", ttl=60, now=time.time() - 120)
    r = run_hook(site.config, "vm1", "migrate", "begin", "-", stdin=domain_xml("/src/images/vm1.qcow2"))
    assert r.returncode != 0
    assert [k for k, _ in entries(site)][-2:] == ["native-migration-refused"] * 2


def test_check_and_consume_refuses_group_readable_permits_and_bad_uuids(tmp_path):
    path = write_permit(tmp_path, migration_id="m1", uuid=UUID, name="vm1", ttl=60)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    os.chmod(path, 0o640)
    with pytest.raises(PermitError, match="not a private file"):
        check_and_consume(tmp_path, uuid=UUID, name="vm1")
    with pytest.raises(PermitError, match="not a domain uuid"):
        check_and_consume(tmp_path, uuid="../../etc/passwd", name="vm1")
    with pytest.raises(PermitError, match="no uuid"):
        check_and_consume(tmp_path, uuid=None, name="vm1")
    path = write_permit(tmp_path, migration_id="m3", uuid=UUID.upper(), name="vm1", ttl=60)
    assert check_and_consume(tmp_path, uuid=UUID, name="vm1") == "m3"

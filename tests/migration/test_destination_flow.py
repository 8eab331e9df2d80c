"""``IncomingMigration`` (B's cold flow) against libvirt's test driver, fed by A's real link.

A's side is migsec's own code (``link.connect``, the record layer and ``dataplane.send``) with
streams built here from a test-driver save image, so B runs exactly what it runs in migsecd:
handshake, receive into staging, integrity, the save image's check, the restore. The test
driver refuses libvirt's paused-restore flag, so B's restore always fails: B must then discard
everything and tell A; the branches after the receipt are in test_commit_flow.py (the seam
that restores paused) and test_recovery.py (A's decision brought by recovery).
"""
from __future__ import annotations

import pytest

from migsec import virt
from migsec.migration import dataplane, link
from migsec.errors import IntegrityError, MigsecError
from migsec.transfer.source import StreamSource
from orchestration import B_DID, phases


def prepared(p, name="vm1", disk_bytes=256 * 1024):
    """A guest at A, saved (no flags: what the test driver can do) into a save image."""
    disk = p.guest(name, disk_bytes=disk_bytes)
    grant = p.grant(name)
    xml = virt.domain_xml(p.conn, name)
    image = p.root / "a" / f"{name}.save"
    virt.save_domain(p.conn, name, str(image))
    return grant, disk, image, xml


def streams(disk, image, xml):
    return [StreamSource(1, "domain.xml", "xml", data=xml.encode()), StreamSource(2, "disk0", "disk", path=disk),
            StreamSource(3, "memory", "memory", path=image)]


def connect(p, grant, **kw):
    return link.connect(p.a, p.a.peers.get(B_DID), grant.request, grant.token,
                        migration_id=grant.migration_id, **kw)


def send(session, srcs):
    for s in srcs:
        s.start_digest()
    return dataplane.send(session, iter(srcs), bandwidth=None, progress=lambda *a: None, timeout=30)


def target(p, disk):
    return p.root / "b" / "images" / disk.name


def test_a_failed_restore_discards_everything_and_tells_the_source(p):
    grant, disk, image, xml = prepared(p)
    mid = grant.migration_id
    session = connect(p, grant)
    try:
        result = send(session, streams(disk, image, xml))
        assert {e.name for e in result.manifest.streams} == {"domain.xml", "disk0", "memory"}
        answer = session.control.recv_control(30)
    finally:
        session.close()
    p.endpoint.wait_idle()
    # B verified every stream, checked the save image names the request's UUID, then libvirt
    # refused the restore (the test driver has no paused restore): B aborts before any receipt
    # (A learns only the code and its fixed text; B's journal keeps why)
    assert answer["t"] == "abort" and answer["reason"].startswith("internal: ")
    assert "restore" in str(p.b.journal.get(mid).data.get("reason", "")).lower()
    assert phases(p.b, mid) == ["accepted", "receiving", "received", "discarded"]
    assert "receipt" not in p.b.journal.get(mid).data
    assert not (p.root / "b/state/staging" / f"in-{mid}").exists()
    assert not target(p, disk).exists()  # the installed disk went with the rest
    assert p.state("vm1") == "shutoff"  # never restored (running) by B


def test_a_stream_that_fails_integrity_is_refused_and_discarded(p):
    grant, disk, image, xml = prepared(p)
    mid = grant.migration_id
    srcs = streams(disk, image, xml)
    srcs[1].digest()  # the disk's digest is fixed; its content then changes under A
    with open(disk, "r+b") as fh:
        fh.write(b"changed after hashing")
    session = connect(p, grant)
    try:
        with pytest.raises(IntegrityError, match="did not match its digest"):  # B names no stream to A
            send(session, srcs)
    finally:
        session.close()
    p.endpoint.wait_idle()
    assert p.b.journal.get(mid).phase == "discarded"
    assert not (p.root / "b/state/staging" / f"in-{mid}").exists()
    assert not target(p, disk).exists()


def send_until_cut(p, grant, disk, image, xml) -> None:
    """A's first connection, which the endpoint cuts (as ``p.endpoint`` was told)."""
    session = connect(p, grant)
    try:
        with pytest.raises(MigsecError):
            send(session, streams(disk, image, xml))
    finally:
        session.close()


def resume_to_the_end(p, grant, disk, image, xml) -> dict:
    """A reconnects with resume_of and sends everything; B's answer at the end."""
    session = connect(p, grant, resume_of=grant.migration_id)
    try:
        send(session, streams(disk, image, xml))
        answer = session.control.recv_control(30)
    finally:
        session.close()
    p.endpoint.wait_idle()
    mid = grant.migration_id
    assert answer["t"] == "abort"  # the restore fails here as above, so B discards at the end
    assert p.b.journal.get(mid).data["attempt"] == "resume"
    assert phases(p.b, mid) == ["accepted", "receiving", "received", "discarded"]
    return answer


def test_a_cut_keeps_the_staged_part_and_a_resume_continues_it(p):
    grant, disk, image, xml = prepared(p, disk_bytes=4 * 1024 * 1024)
    mid = grant.migration_id
    p.endpoint.drop_after = 256 * 1024
    send_until_cut(p, grant, disk, image, xml)
    p.endpoint.wait_idle()
    entry = p.b.journal.get(mid)
    assert entry.phase == "receiving" and not entry.decided  # connection lost: kept for a resume
    staging = p.root / "b/state/staging" / f"in-{mid}"
    assert staging.is_dir()
    p.endpoint.drop_after = None
    resume_to_the_end(p, grant, disk, image, xml)  # B accepts it as a resume of the same migration
    assert p.b.journal.get(mid).phase == "discarded" and not staging.exists()


def test_a_resume_supersedes_a_connection_that_went_silent_at_b(p):
    """The link died without a reset: A gave up its connection, B's worker still waits on its
    own end. A's resume shuts that end down, waits for the worker to let go and continues."""
    grant, disk, image, xml = prepared(p, disk_bytes=4 * 1024 * 1024)
    p.endpoint.stall_after = 256 * 1024
    send_until_cut(p, grant, disk, image, xml)
    assert link.active_incoming() == 1  # B has not noticed: its worker still waits for data
    resume_to_the_end(p, grant, disk, image, xml)
    assert link.active_incoming() == 0


def test_a_resume_of_a_migration_b_does_not_know_is_refused(p):
    grant, disk, image, xml = prepared(p)
    # B says only that it does not expect this (its log says which migration it does not know)
    with pytest.raises(MigsecError, match="refused: what it received is not acceptable"):
        connect(p, grant, resume_of=grant.migration_id)
    p.endpoint.wait_idle()
    assert p.b.journal.list() == []

"""The signed migration plan over a real link (``orchestration.pair``, libvirt's test driver).

The plan is the only carrier of the VM's facts between the domains: a disk path holding ``|``
and ``,`` (the separators of the version-1 string options) crosses unchanged; a request without
a plan is refused on both sides, a malformed one never gets past B's handshake, each naming the
problem where the operator reads it (A's error, B's log). The test driver cannot restore a save
image paused, so a cold move stops after B verified and installed every stream (its journal's
``received``); the lab test ``tests/e2e/test_migration.py`` moves such a guest to the end.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import Any

import pytest

from migsec import virt
from migsec.crypto import random_bytes
from migsec.migration import dataplane, link
from migsec.migration.source import OutgoingMigration
from migsec.errors import HandshakeError, MalformedMessageError, MigsecError
from migsec.protocol.messages import AuthorizationTicket, MigrationRequest
from migsec.transfer.source import StreamSource
from orchestration import A_DID, B_DID, USER, guest_xml, phases

AWKWARD = "vm1|disk,0.img"  # a file name the version-1 options split into two files


def signed(p, request: MigrationRequest) -> str:
    """Authr_Tkt by A's key over ``request`` (what A's AZ would sign)."""
    now = p.a.clock()
    return AuthorizationTicket(src_did=A_DID, dest_did=B_DID, user_id=USER, vm=request.vm,
                               request_digest=request.digest(), nonce4=random_bytes(16), issued_at=now,
                               expires_at=now + dt.timedelta(minutes=5)).sign(p.a.identity.key)


def test_a_disk_path_with_a_pipe_and_a_comma_crosses_to_its_mapped_target(p):
    disk = p.root / "a" / "src" / AWKWARD
    disk.parent.mkdir(parents=True)
    disk.write_bytes(bytes(range(256)) * 1024)
    virt.define_domain(p.conn, guest_xml("vm1", disk))
    virt.start_domain(p.conn, "vm1")
    grant = p.grant("vm1")
    plan = grant.request.require_plan()
    assert plan.files == plan.top_files == (str(disk),)
    # B's storage mapping puts it under its image_dir with the same name, "|" and "," kept
    target = p.root / "b" / "images" / AWKWARD
    assert dataplane.disk_map(p.b, dataplane.request_files(grant.request)) == {str(disk): str(target)}
    xml = virt.domain_xml(p.conn, "vm1")
    image = p.root / "a" / "vm1.save"
    virt.save_domain(p.conn, "vm1", str(image))
    session = link.connect(p.a, p.a.peers.get(B_DID), grant.request, grant.token,
                           migration_id=grant.migration_id)
    srcs = [StreamSource(1, "domain.xml", "xml", data=xml.encode()), StreamSource(2, "disk0", "disk", path=disk),
            StreamSource(3, "memory", "memory", path=image)]
    for s in srcs:
        s.start_digest()
    try:
        result = dataplane.send(session, iter(srcs), bandwidth=None, progress=lambda *a: None, timeout=30)
        answer = session.control.recv_control(30)
    finally:
        session.close()
    p.endpoint.wait_idle()
    mid = grant.migration_id
    assert [s.name for s in result.manifest.streams] == ["domain.xml", "disk0", "memory"]
    # B took the plan from the signed request (journaled as it arrived), installed the disk at its
    # target and verified every SHA-256 ("received"); only the test driver's restore failed then
    entry = p.b.journal.get(mid)
    assert entry.plan() == plan
    assert phases(p.b, mid) == ["accepted", "receiving", "received", "discarded"]
    assert "restore" in str(entry.data.get("reason", "")).lower()
    assert answer["t"] == "abort" and answer["reason"].startswith("internal: ")
    assert not target.exists()  # discarded with the rest


def test_a_request_without_a_plan_is_refused_by_b_naming_the_problem(p, caplog):
    p.guest("vm1")
    grant = p.grant("vm1")
    bare = MigrationRequest(vm="vm1", mode="cold", dest_did=B_DID, options=grant.request.options)
    with caplog.at_level(logging.INFO, logger="migsecd.link"):
        # A is told the code's fixed text; B's log says what was wrong
        with pytest.raises(MigsecError, match="refused: what it received is not acceptable"):
            link.connect(p.a, p.a.peers.get(B_DID), bare, signed(p, bare), migration_id=grant.migration_id)
        p.endpoint.wait_idle()
    assert f"refusing migration {grant.migration_id}" in caplog.text
    assert "carries no migration plan" in caplog.text
    assert p.b.journal.list() == []


def test_a_grant_without_a_plan_never_leaves_a(p):
    p.guest("vm1")
    grant = p.grant("vm1")
    bare = MigrationRequest(vm="vm1", mode="cold", dest_did=B_DID, options=grant.request.options)
    job = OutgoingMigration(p.a, dataclasses.replace(grant, request=bare, token=signed(p, bare)), p.events.append)
    with pytest.raises(MalformedMessageError, match="Mig_Rqst for 'vm1' carries no migration plan"):
        job.run()
    assert p.endpoint.connections == 0
    assert p.a.journal.list() == [] and p.state("vm1") == "running"


class _ForgedPlan(MigrationRequest):
    """A request whose signed claims carry a plan this codebase would never build (another
    implementation's bug, or a hostile source): the claims, the digest and so the signatures agree."""

    def claims(self) -> dict[str, Any]:
        claims = super().claims()
        claims["plan"]["disks"][0]["virtual_size"] = -1
        return claims


def test_a_malformed_plan_fails_bs_handshake_naming_the_field(p, caplog):
    p.guest("vm1")
    grant = p.grant("vm1")
    request = grant.request
    forged = _ForgedPlan(vm=request.vm, mode=request.mode, dest_did=request.dest_did, options=request.options,
                         plan=request.plan)
    with caplog.at_level(logging.WARNING, logger="migsecd.destination"):
        # a MigReq that does not parse gets no answer (nothing is signed for it): A sees the close
        with pytest.raises(HandshakeError, match="closed the connection during the handshake"):
            link.connect(p.a, p.a.peers.get(B_DID), forged, signed(p, forged), migration_id=grant.migration_id)
        p.endpoint.wait_idle()
    assert "handshake failed" in caplog.text and "migration plan disk" in caplog.text
    assert "virtual_size" in caplog.text
    assert p.b.journal.list() == []


def test_the_az_builds_and_signs_the_plan_naming_the_vm_as_libvirt_does(p):
    """Steps 1-4 at A (the AS and the AZ of migsecd, the client's side of the local exchange):
    the request names the guest by its UUID; the grant's request names it by libvirt's name,
    carries the plan libvirt's description gives, and the ticket covers it."""
    from migsec.auth.servers import AuthenticationServer, AuthorizationServer
    from migsec.protocol.local import AuthReply, ClientLogin, make_migration_request

    p.a.users.add(USER, "correct horse battery staple", roles=("migration-admin",))
    p.guest("vm1")
    info = virt.describe_domain(p.conn, "vm1")
    login = ClientLogin(USER, clock=p.a.clock)
    reply = AuthenticationServer(p.a).handle(login.request.encode().decode())["reply"]
    creds = login.finish(AuthReply.decode(reply.encode()), password="correct horse battery staple")
    asked = MigrationRequest(vm=info.uuid, mode="cold", dest_did=B_DID, options={"persistent": True})
    sealed = make_migration_request(creds, asked, clock=p.a.clock).encode().decode()
    grant = AuthorizationServer(p.a).authorize(sealed)
    plan = grant.request.require_plan()
    assert grant.request.vm == plan.vm_name == grant.ticket.vm == "vm1"
    assert (plan.vm_uuid, plan.vcpus, plan.memory_bytes) == (info.uuid, info.vcpus, info.memory_bytes)
    assert plan.files == (str(p.root / "a" / "src" / "vm1.img"),)
    assert dict(grant.request.options) == {"persistent": True}  # the user's options, no VM facts
    assert grant.ticket.request_digest == grant.request.digest()

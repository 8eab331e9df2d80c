"""B's refusal over a real handshake on loopback TCP (migsec.migration.link): A learns B's code in
its own words, B's log keeps the detail, and nothing local to B (a path, an exception class, a
library's message) crosses; a peer that cannot be reached is a named NetworkError."""
from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transfer"))
from transfer_helpers import A_DID, B_DID, domains  # noqa: E402,F401

from migsec.crypto import random_bytes  # noqa: E402
from migsec.daemon import endpoint  # noqa: E402
from migsec.migration import link  # noqa: E402
from migsec.errors import (  # noqa: E402
    RESUMABLE,
    AuthorizationDenied,
    NetworkError,
    PeerUnreachableError,
    VirtError,
)
from migsec.protocol import AuthorizationTicket, MigrationRequest, ReplayCache  # noqa: E402

FAKE_SOCKET = "/run/fake-b/libvirt/libvirt-sock"


def now() -> datetime:
    return datetime.now(timezone.utc)


def services(identity, trust, audited: list) -> SimpleNamespace:
    return SimpleNamespace(identity=identity, trust=trust, clock=now, replay=ReplayCache(clock=now),
                           did=identity.did, audit=lambda kind, mid=None, **f: audited.append((kind, f)))


class DestinationB:
    """B's endpoint.accept_async on a loopback listener, in its own event loop thread."""

    def __init__(self, svc) -> None:
        self.svc = svc
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.result: object = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self.thread.start()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.run_in_executor(None, self.listener.accept)
        conn.setblocking(False)
        try:
            self.result = await endpoint.accept_async(self.svc, conn, loop, None)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.result = exc
        finally:
            conn.close()
            self.listener.close()


def migrate_to(b: DestinationB, svc_a, domains):
    request = MigrationRequest(vm="vm1", mode="cold", dest_did=B_DID)
    t = now()
    token = AuthorizationTicket(src_did=A_DID, dest_did=B_DID, user_id="alice", vm="vm1",
                                request_digest=request.digest(), nonce4=random_bytes(16), issued_at=t,
                                expires_at=t + timedelta(minutes=5)).sign(domains.a.key)
    peer = SimpleNamespace(did=B_DID, cert_pem=domains.b.cert_pem, address=f"127.0.0.1:{b.port}", fingerprint=None)
    return link.connect(svc_a, peer, request, token, migration_id="m-err-1")


@pytest.mark.parametrize("failure, decision, words", [
    (VirtError(f"cannot connect to {FAKE_SOCKET}: Permission denied"), "Error", "internal error"),
    (AuthorizationDenied(f"{B_DID} already has a file at /srv/b/vm1.qcow2 (where vm1's disk would go)",
                         where="destination", decision="Conflict"), "Conflict", "already exists there"),
    (AuthorizationDenied(f"{B_DID} policy: Deny for receiving 'vm1': tag secret at /etc/migsec/p.xml",
                         where="destination"), "Deny", "denied by its policy"),
])
def test_b_refuses_with_a_code_and_keeps_the_detail_in_its_log(domains, monkeypatch, caplog, failure, decision,
                                                                words):
    def decide(services, proposal):
        raise failure

    monkeypatch.setattr(link, "decide", decide)
    monkeypatch.setattr(link, "store_pinned_source", lambda *a: None)
    audited_a: list = []
    audited_b: list = []
    b = DestinationB(services(domains.b, domains.trust, audited_b))
    caplog.set_level(logging.INFO, logger="migsecd.link")
    with pytest.raises(AuthorizationDenied) as refused:
        migrate_to(b, services(domains.a, domains.trust, audited_a), domains)
    b.thread.join(10)
    assert b.result is None  # a refusal: nothing follows on this connection
    message = str(refused.value)
    assert message.startswith(f"{B_DID} refused: ") and words in message, message
    assert refused.value.where == "destination" and refused.value.decision == decision
    assert "/" not in message and type(failure).__name__ not in message and str(failure) not in message
    # what B signed and A ledgered: the code and fixed text only
    [(_, resp)] = [(k, f) for k, f in audited_a if k == "mig-resp"]
    assert resp["outcome"] == "refused" and "/" not in resp["reason"] and type(failure).__name__ not in resp["reason"]
    # B's own log has the whole story
    assert str(failure) in caplog.text


def test_an_unreachable_peer_is_a_named_network_error(domains):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again below: nothing listens there
    svc = services(domains.a, domains.trust, [])
    b = SimpleNamespace(port=port)
    with pytest.raises(PeerUnreachableError) as err:
        migrate_to(b, svc, domains)
    assert isinstance(err.value, NetworkError) and isinstance(err.value, RESUMABLE)
    assert isinstance(err.value.__cause__, ConnectionRefusedError)

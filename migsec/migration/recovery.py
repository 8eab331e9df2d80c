"""``migsec recover`` and ``migsec jobs``: finishing migrations a crash interrupted.

The rule (DESIGN §3.4, journal docstring): before A's durable ``committed`` the
source copy wins, after it the destination copy wins. A decides; B asks A. The rules are
the commit machines' (``migsec.transfer.commit``): recovery rebuilds them from the journal
(``from_journal``) and feeds them the same events as a session does: ``fail`` (A,
undecided), B's Resumed, A's decision (B); the machines make and sign every decision and
write the journal.

- A, undecided: decide abort (durably), restart the guest at A, tell B to discard.
  A live move is decided from libvirt's outcome at A first: a guest gone from A went to B
  (libvirt's Confirm stopped it), so A commits over B's receipt (its own journaled one, else
  the one B journaled when libvirt's Finish passed, asked for or sent along with B's query).
- A, committed: make sure A's copy is released, send B the commit, B resumes.
- B, not yet committed: ask A; A's answer (commit / abort) is applied; no answer
  or "pending" leaves B's paused copy paused (it never runs without a commit; a live move's
  copy libvirt's Finish left paused likewise).
- B, commit-received: resume here.

A recovery conversation is a fresh handshake whose request says
``purpose=recover``; the initiator's own AZ signs a short-lived ticket for it.

With ``[recovery] auto`` (the default) migsecd runs the same pass once at start, once it
listens (``auto_recover``), so a crash does not leave a guest shut off until someone runs
``migsec recover``; each outcome is logged and audited (``recovered``). One pass runs at
a time: a ``migsec recover`` during it waits for it.
"""
from __future__ import annotations

import logging
import socket
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, cast

from migsec.crypto import random_bytes
from migsec.errors import MigsecError
from migsec.migration import link
from migsec.migration.channel import ControlLink
from migsec.migration.destination import IncomingMigration
from migsec.migration.jobs import describe, journal_writer
from migsec.migration.live import left_this_host
from migsec.migration.release import SourceCopy, journal_fields
from migsec.protocol import RecordLayer
from migsec.protocol.messages import AuthorizationTicket, MigrationRequest
from migsec.transfer.commit import ROLLED_BACK, SourceCommit

if TYPE_CHECKING:
    from migsec.migration.journal import JournalEntry
    from migsec.migration.link import Accepted
    from migsec.daemon.services import Services

log = logging.getLogger("migsecd.recovery")
ANSWER_TIMEOUT_S = 120
SYSTEM_USER = "migsecd"
_pass_lock = threading.Lock()  # one recovery pass at a time (automatic at start, or `migsec recover`)


def list_jobs(services: Services, *, show_all: bool = False) -> list[dict]:
    import time

    day_ago = time.time() - 86400
    entries = [e for e in services.journal.list() if show_all or not e.terminal or e.updated >= day_ago]
    rows = [describe(e) for e in entries]
    running = set(services.running)
    for row in rows:
        row["running"] = row["migration_id"] in running
    return rows


def recover_all(services: Services, emit: Callable[[dict], None]) -> list[dict]:
    with _pass_lock:
        return _recover_all(services, emit)


def auto_recover(services: Services) -> list[dict]:
    """The pass migsecd runs at start (``[recovery] auto``): logged and audited per migration."""
    actions = recover_all(services, lambda event: None)
    for action in actions:
        failed = action["outcome"].startswith("failed")
        (log.error if failed else log.info)("automatic recovery of %s (%s of %s): %s", action["migration_id"],
                                            action["role"], action["domain"], action["outcome"])
        try:
            services.audit("recovered", action["migration_id"], role=action["role"], domain=action["domain"],
                           outcome=action["outcome"], automatic=True)
        except MigsecError as exc:
            log.error("auditing the recovery of %s: %s", action["migration_id"], exc)
    left = [e.migration_id for e in services.journal.list(active_only=True) if e.migration_id not in services.running]
    if left:
        log.warning("after automatic recovery %d migration(s) are still unfinished (%s): a peer may be "
                    "unreachable; `migsec recover` tries again", len(left), ", ".join(left))
    return actions


def _recover_all(services: Services, emit: Callable[[dict], None]) -> list[dict]:
    actions = []
    for entry in services.journal.list(active_only=True):
        if entry.migration_id in services.running:
            continue  # in progress in this daemon
        try:
            outcome = recover_one(services, entry)
        except MigsecError as exc:
            outcome = f"failed: {exc}"
            log.error("recovering %s: %s", entry.migration_id, exc)
        emit({"event": "step", "message": f"{entry.migration_id}: {outcome}"})
        actions.append({"migration_id": entry.migration_id, "role": entry.role,
                        "domain": entry.data.get("domain"), "outcome": outcome})
    return actions


def recover_one(services: Services, entry: JournalEntry) -> str:
    if entry.role == "source":
        return _recover_source(services, entry)
    return _recover_destination(services, entry)


# ---- A -----------------------------------------------------------------------------------------
class _Source:
    """A's commit machine as the journal left it, with A's copy (``SourceCopy``) as its actions."""

    def __init__(self, services: Services, entry: JournalEntry) -> None:
        self.copy = SourceCopy.from_journal(services, entry)
        self.how: str | None = None
        self.report: dict = {}
        self.machine = SourceCommit.from_journal(
            entry, src_did=services.did, key=services.identity.key, peer_key=None,
            journal=journal_writer(services, entry.migration_id, "source"), resume_vm=self._restart,
            release_vm=self._release, clock=services.clock)

    def _restart(self) -> str:
        self.how = self.copy.restart()
        return self.how

    def _release(self) -> dict:
        self.report = self.copy.release()
        if self.report["errors"]:  # the machine stays committed: recover tries again
            raise MigsecError(f"{self.copy.domain} is committed to {self.copy.destination} but releasing it "
                              "here failed: " + "; ".join(self.report["errors"]))
        return journal_fields(self.report)


def _recover_source(services: Services, entry: JournalEntry, *, tell_peer: bool = True,
                    peer_receipt: Callable[[], Any] | None = None) -> str:
    """A's recovery. ``tell_peer``: tell B the outcome (not when B asked: its answer does);
    ``peer_receipt``: B's receipt as B sent it with its question, (token, B as a Peer) (live)."""
    mid, domain = entry.migration_id, cast(str, entry.data.get("domain"))
    source = _Source(services, entry)
    commit = source.machine
    if commit.live and not commit.committed and commit.state != ROLLED_BACK and commit.abort_token is None:
        _decide_from_libvirt(services, entry, commit, peer_receipt)
    if not commit.committed:
        # presumed abort: no commit is durable, so the source copy wins
        abort = commit.fail("recovered after a crash (no decision)")
        services.audit("decision", mid, role="source", token=abort, outcome="abort", reason="recovery")
        how = source.how or "rolled back"
        if not tell_peer:
            return f"rolled back: {domain} {how} here"
        return f"rolled back: {domain} {how} here; " + _tell_peer(services, entry, {"t": "decision", "jws": abort})
    # committed: the destination copy wins; make sure ours is released, then tell B
    commit.release()
    kept = "".join(f"; the moved disk {d['path']} could not be removed ({d['error']})"
                   for d in source.report["disks_not_removed"])
    if not tell_peer:
        return f"committed: {domain} released here; {entry.data.get('peer')} resumes it on this answer{kept}"
    answer = _ask_peer(services, entry, {"t": "decision", "jws": commit.decision_token}, source=commit)
    if answer is not None and answer.get("t") == "resumed":
        return f"committed: {domain} runs at {entry.data.get('peer')}{kept}"
    return (f"committed: {domain} released here; {entry.data.get('peer')} has not confirmed yet "
            f"(run recover again){kept}")


def _decide_from_libvirt(services: Services, entry: JournalEntry, commit: SourceCommit,
                         peer_receipt: Callable[[], Any] | None) -> None:
    """A live move A did not decide: a guest that left this host (libvirt's Confirm stopped it)
    waits paused at B, so the machine commits over B's receipt (``moved_by_libvirt``). A guest
    still active here leaves the machine undecided: the presumed abort follows."""
    mid, domain = entry.migration_id, str(entry.data.get("domain"))
    state = left_this_host(services, entry)
    if state is None:
        return
    receipt = None
    if commit.receipt_token is None:
        answer = peer_receipt() if peer_receipt is not None else _ask_peer(
            services, entry, {"t": "receipt?"}, want_key=True, kind="receipt")
        token, peer = answer if answer is not None else (None, None)
        if not isinstance(token, str) or peer is None:
            raise MigsecError(f"{domain} left this host for {entry.data.get('peer')}, which holds it paused, but "
                              "its receipt could not be had to commit over (unreachable?): run recover again")
        commit.peer_key, receipt = peer.public_key, token
        services.audit("receipt", mid, role="source", mode="live", peer_token=token, peer_cert_pem=peer.cert_pem,
                       peer_did=peer.did, recovery=True)
    decision = commit.moved_by_libvirt(receipt, how=f"libvirt (found by recover: {domain} is {state} here, "
                                                    "it left this host)")
    services.audit("decision", mid, role="source", token=decision, outcome="commit", mode="live", recovery=True)


# ---- B -----------------------------------------------------------------------------------------
def _recover_destination(services: Services, entry: JournalEntry) -> str:
    mid = entry.migration_id
    job = IncomingMigration(services, mid)
    if entry.decided:
        job.resume_committed()
        return f"committed: {entry.data.get('domain')} runs here"
    # a live move's paused copy is in doubt like a cold one: A decides (from libvirt's outcome),
    # over the receipt B journaled when libvirt's Finish passed, sent along
    query: dict[str, Any] = {"t": "query"}
    if isinstance(entry.data.get("receipt"), str):
        query["receipt"] = entry.data["receipt"]
    answer = _ask_peer(services, entry, query, want_key=True)
    if answer is None:
        return f"{entry.data.get('peer')} unreachable: left as is (a paused copy never runs without its commit)"
    message, peer = answer
    if message.get("t") == "pending":
        return f"{entry.data.get('peer')} says the migration is still in progress"
    reply = job.decision_from_source(message, peer)
    if reply.get("t") == "resumed":
        return f"committed by {entry.data.get('peer')}: {entry.data.get('domain')} runs here"
    return f"aborted by {entry.data.get('peer')}: partial files and any paused copy removed here"


# ---- talking to the peer --------------------------------------------------------------------------
def _session(services: Services, entry: JournalEntry) -> Any:
    peer = services.peers.get(cast(str, entry.data.get("peer")))
    request = MigrationRequest(vm=str(entry.data.get("domain")), mode="cold", dest_did=peer.did,
                               options={"purpose": "recover"})
    now = services.clock()
    ticket = AuthorizationTicket(src_did=services.did, dest_did=peer.did, user_id=SYSTEM_USER, vm=request.vm,
                                 request_digest=request.digest(), nonce4=random_bytes(16), issued_at=now,
                                 expires_at=now + timedelta(minutes=5))
    token = ticket.sign(services.identity.key)
    services.audit("authr-tkt", entry.migration_id, role=entry.role, token=token, purpose="recover")
    return link.connect(services, peer, request, token, migration_id=entry.migration_id)


def _ask_peer(services: Services, entry: JournalEntry, message: dict, *, want_key: bool = False,
              source: SourceCommit | None = None, kind: str | None = None) -> Any:
    """Send ``message`` to the peer on a recovery session, return its answer (None if there is
    none; with the Peer when ``want_key``; when ``kind`` is given, its "jws" if the answer is of
    that kind, else None). A Resumed answer is fed to A's machine ``source`` (which checks it
    and journals it)."""
    try:
        session = _session(services, entry)
    except MigsecError as exc:
        log.warning("recovery of %s: cannot reach %s: %s", entry.migration_id, entry.data.get("peer"), exc)
        return None
    try:
        session.control.send_control(message)
        answer = session.control.recv_control(ANSWER_TIMEOUT_S)
        if answer.get("t") == "resumed" and source is not None:
            source.peer_key = session.peer.public_key
            source.resumed_received(str(answer.get("jws")))
            services.audit("resumed", entry.migration_id, role=entry.role, peer_token=answer["jws"],
                           peer_cert_pem=session.peer.cert_pem, peer_did=session.peer.did)
        if kind is not None:
            answer = answer.get("jws") if answer.get("t") == kind else None
        return (answer, session.peer) if want_key else answer
    except MigsecError as exc:
        log.warning("recovery of %s: %s did not answer: %s", entry.migration_id, entry.data.get("peer"), exc)
        return None
    finally:
        session.close()


def _tell_peer(services: Services, entry: JournalEntry, message: dict) -> str:
    answer = _ask_peer(services, entry, message)
    if answer is None:
        return f"{entry.data.get('peer')} unreachable (it will ask when it recovers)"
    return f"{entry.data.get('peer')} answered {answer.get('t')}"


def answer_recovery(services: Services, conn: socket.socket, accepted: Accepted) -> None:
    """The responder's side of a recovery conversation (in a worker thread)."""
    mid = accepted.keys.migration_id
    control = ControlLink(conn, RecordLayer(accepted.keys, "destination"), accepted.src_did)
    try:
        message = control.recv_control(ANSWER_TIMEOUT_S)
        entry = services.journal.get(mid)
        reply: dict[str, Any]
        if entry.role == "destination" and message.get("t") == "receipt?":
            # A's recovery found its guest gone (live) and commits over the receipt we journaled
            receipt = entry.data.get("receipt")
            reply = {"t": "none"}
            if isinstance(receipt, str) and not entry.terminal:
                services.audit("receipt", mid, role="destination", token=receipt, mode="live", asked="recovery")
                reply = {"t": "receipt", "jws": receipt}
        elif entry.role == "destination":
            # A tells us its decision
            reply = IncomingMigration(services, mid).decision_from_source(message, accepted.peer)
        elif mid in services.running:  # B asks what A decided
            reply = {"t": "pending"}
        else:
            if not entry.decided and not entry.terminal:
                # A finishes its own side first, then answers: presumed abort (live: libvirt's
                # outcome may decide commit, over the receipt B sent along)
                outcome = _recover_source(services, entry, tell_peer=False,
                                          peer_receipt=lambda: (message.get("receipt"), accepted.peer))
                log.info("migration %s: asked by %s, decided (%s)", mid, accepted.src_did, outcome)
                entry = services.journal.get(mid)
            # the machine's decision: the commit, or the abort it journaled (the same every time)
            commit = _Source(services, entry).machine
            token = commit.decision_token if commit.committed else commit.fail(f"asked by {accepted.src_did}")
            reply = {"t": "decision", "jws": token}
        control.send_control(reply)
    except MigsecError as exc:
        log.warning("recovery conversation for %s with %s failed: %s", mid, accepted.src_did, exc)

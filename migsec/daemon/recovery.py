"""``migsec recover`` and ``migsec jobs``: finishing migrations a crash interrupted.

The rule (DESIGN §3.4, journal docstring): before A's durable ``committed`` the
source copy wins, after it the destination copy wins. A decides; B asks A.

- A, undecided: decide abort (durably), restart the guest at A, tell B to discard.
- A, committed: make sure A's copy is released, send B the commit, B resumes.
- B, not yet committed: ask A; A's answer (commit / abort) is applied; no answer
  or "pending" leaves B's paused copy paused (it never runs without a commit).
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
import shutil
import socket
import threading
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

from migsec.errors import MigsecError

if TYPE_CHECKING:
    from migsec.daemon.journal import JournalEntry
    from migsec.daemon.link import Accepted
    from migsec.daemon.services import Services

log = logging.getLogger("migsecd.recovery")
ANSWER_TIMEOUT_S = 120
SYSTEM_USER = "migsecd"
_pass_lock = threading.Lock()  # one recovery pass at a time (automatic at start, or `migsec recover`)


def list_jobs(services: Services, *, show_all: bool = False) -> list[dict]:
    from migsec.daemon.jobs import describe

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
def _abort_decision(services: Services, entry: JournalEntry, reason: str) -> str:
    from migsec.protocol import Decision

    return Decision(migration_id=entry.migration_id, src_did=services.did, dest_did=str(entry.data.get("peer")),
                    decision="abort", issued_at=services.clock(), reason=reason).sign(services.identity.key)


def _recover_source(services: Services, entry: JournalEntry, *, tell_peer: bool = True,
                    peer_receipt: Callable[[], Any] | None = None) -> str:
    """A's recovery. ``tell_peer``: tell B the outcome (not when B asked: its answer does);
    ``peer_receipt``: B's receipt as B sent it with its question (live)."""
    from migsec import virt
    from migsec.daemon.jobs import record
    from migsec.daemon.release import journal_plan, release_source
    from migsec.daemon.source import restart_at_source

    # every source journal is created naming its domain and peer (jobs.record)
    mid, domain = entry.migration_id, cast(str, entry.data.get("domain"))
    save_image = Path(entry.data["save_image"]) if entry.data.get("save_image") else None
    live = entry.data.get("mode") == "live"
    if not entry.decided and live:
        # libvirt's outcome decides: a guest gone from here went to B (commit over B's receipt)
        from migsec.daemon.live import decide_from_libvirt

        if decide_from_libvirt(services, entry, peer_receipt or (
                lambda: _ask_peer(services, entry, {"t": "receipt?"}, want_key=True, kind="receipt"))):
            entry = services.journal.get(mid)
    if not entry.decided:
        # presumed abort: no commit is durable, so the source copy wins
        if entry.phase != "aborted":
            record(services, mid, "source", "aborted", reason="recovered after a crash (no decision)")
        abort = _abort_decision(services, entry, "recovered after a crash before the decision")
        services.audit("decision", mid, role="source", token=abort, outcome="abort", reason="recovery")
        with virt.connect(services.config.libvirt.uri) as conn:
            if live:
                from migsec.daemon.live import restart_after_abort

                how = restart_after_abort(conn, domain, was_paused=bool(entry.data.get("was_paused")))
            else:
                how = restart_at_source(conn, domain, save_image, paused=bool(entry.data.get("was_paused")))
        if entry.data.get("work_dir"):
            shutil.rmtree(entry.data["work_dir"], ignore_errors=True)
        record(services, mid, "source", "rolled-back", how=how)
        if not tell_peer:
            return f"rolled back: {domain} {how} here"
        return f"rolled back: {domain} {how} here; " + _tell_peer(services, entry, {"t": "decision", "jws": abort})
    # committed: the destination copy wins; make sure ours is released, then tell B
    options = entry.data.get("options") or {}
    with virt.connect(services.config.libvirt.uri) as conn:
        released = release_source(services, conn, mid, str(domain), options, str(entry.data.get("peer")),
                                  plan=journal_plan(entry))
    if released["errors"]:
        raise MigsecError(f"{domain} is committed to {entry.data.get('peer')} but releasing it here failed: "
                          + "; ".join(released["errors"]))
    kept = "".join(f"; the moved disk {d['path']} could not be removed ({d['error']})"
                   for d in released["disks_not_removed"])
    if entry.data.get("work_dir"):
        shutil.rmtree(entry.data["work_dir"], ignore_errors=True)
    if entry.phase == "committed":
        record(services, mid, "source", "released")
    if not tell_peer:
        return f"committed: {domain} released here; {entry.data.get('peer')} resumes it on this answer{kept}"
    answer = _ask_peer(services, entry, {"t": "decision", "jws": entry.data.get("decision")})
    if answer is not None and answer.get("t") == "resumed":
        record(services, mid, "source", "done", resumed=answer.get("jws"))
        return f"committed: {domain} runs at {entry.data.get('peer')}{kept}"
    return (f"committed: {domain} released here; {entry.data.get('peer')} has not confirmed yet "
            f"(run recover again){kept}")


# ---- B -----------------------------------------------------------------------------------------
def _recover_destination(services: Services, entry: JournalEntry) -> str:
    from migsec.daemon.destination import IncomingMigration

    mid = entry.migration_id
    job = IncomingMigration(services, mid)
    if entry.decided:
        job.resume_here()
        if services.journal.get(mid).phase == "commit-received":
            job.journal("resumed")
        job.finish()
        return f"committed: {entry.data.get('domain')} runs here"
    # a live move's paused copy is in doubt like a cold one: A decides (from libvirt's outcome),
    # over the receipt B journaled when libvirt's Finish passed
    query: dict[str, Any] = {"t": "query"}
    if isinstance(entry.data.get("receipt"), str):
        query["receipt"] = entry.data["receipt"]
    answer = _ask_peer(services, entry, query, want_key=True)
    if answer is None:
        return f"{entry.data.get('peer')} unreachable: left as is (a paused copy never runs without its commit)"
    message, peer = answer
    if message.get("t") == "pending":
        return f"{entry.data.get('peer')} says the migration is still in progress"
    reply = job.apply_decision(message, peer)
    if reply.get("t") == "resumed":
        return f"committed by {entry.data.get('peer')}: {entry.data.get('domain')} runs here"
    return f"aborted by {entry.data.get('peer')}: partial files and any paused copy removed here"


# ---- talking to the peer --------------------------------------------------------------------------
def _session(services: Services, entry: JournalEntry) -> Any:
    from migsec.crypto import random_bytes
    from migsec.daemon import link
    from migsec.protocol.messages import AuthorizationTicket, MigrationRequest

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
              kind: str | None = None) -> Any:
    """Send ``message`` to the peer, return its answer (with the Peer when ``want_key``; when
    ``kind`` is given, its "jws" if the answer is of that kind, else None); None if unreachable."""
    from migsec.protocol import Resumed, token_hash

    try:
        session = _session(services, entry)
    except MigsecError as exc:
        log.warning("recovery of %s: cannot reach %s: %s", entry.migration_id, entry.data.get("peer"), exc)
        return None
    try:
        session.control.send_control(message)
        answer = session.control.recv_control(ANSWER_TIMEOUT_S)
        if answer.get("t") == "resumed":
            resumed = Resumed.verify(answer.get("jws"), session.peer.public_key, migration_id=entry.migration_id)
            if resumed.decision_hash != token_hash(str(message.get("jws"))):
                raise MigsecError(f"{session.peer.did}'s Resumed answers another decision")
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
    from migsec.daemon.channel import ControlLink
    from migsec.daemon.destination import IncomingMigration
    from migsec.protocol import RecordLayer

    mid = accepted.keys.migration_id
    control = ControlLink(conn, RecordLayer(accepted.keys, "destination"), accepted.src_did)
    try:
        message = control.recv_control(ANSWER_TIMEOUT_S)
        entry = services.journal.get(mid)
        if entry.role == "destination" and message.get("t") == "receipt?":
            # A's recovery found its guest gone (live) and commits over the receipt we journaled
            receipt = entry.data.get("receipt")
            reply: dict[str, Any] = {"t": "none"}
            if isinstance(receipt, str) and not entry.terminal:
                services.audit("receipt", mid, role="destination", token=receipt, mode="live", asked="recovery")
                reply = {"t": "receipt", "jws": receipt}
        elif entry.role == "destination":
            # A tells us its decision
            reply = IncomingMigration(services, mid).apply_decision(message, accepted.peer)
        else:
            # B asks what A decided
            if mid in services.running:
                reply = {"t": "pending"}
            elif entry.decided:
                reply = {"t": "decision", "jws": entry.data.get("decision")}
            else:
                # presumed abort: A finishes its own side first, then answers
                # (live: libvirt's outcome may decide commit, over the receipt B sent along)
                outcome = (_recover_source(services, entry, tell_peer=False,
                                           peer_receipt=lambda: (message.get("receipt"), accepted.peer))
                           if not entry.terminal else entry.phase)
                entry = services.journal.get(mid)
                if entry.decided:
                    log.info("migration %s: asked by %s, answered commit (%s)", mid, accepted.src_did, outcome)
                    reply = {"t": "decision", "jws": entry.data.get("decision")}
                else:
                    log.info("migration %s: asked by %s, decided abort (%s)", mid, accepted.src_did, outcome)
                    token = _abort_decision(services, entry, "no commit decision at the source")
                    services.audit("decision", mid, role="source", token=token, outcome="abort")
                    reply = {"t": "decision", "jws": token}
        control.send_control(reply)
    except MigsecError as exc:
        log.warning("recovery conversation for %s with %s failed: %s", mid, accepted.src_did, exc)

"""The commit exchange (DESIGN §3.4) as two small state machines, one per side.

Each machine is the one writer of its side's migration journal and the only place that makes
and signs a commit or abort decision (A) or applies one (B), for a cold move and a live one.
The orchestrators (``migsec.migration.source`` / ``destination`` / ``live``) feed them events and
carry out what they return; ``migsec recover`` rebuilds them from the journal
(``from_journal``) and feeds them the same events: the peer's decision or answer, libvirt's
outcome (live), or ``fail``.

Source (coordinator)::

    AWAIT_STREAMS (authorized, handshaken, suspended, streaming: journaled progress)
        --streams_sent (cold) | digests_sent (live)--> AWAIT_RECEIPT (saved)
        --receipt_received--> AWAIT_RESUMED --resumed_received--> DONE   (A's copy released first)
    AWAIT_RESUMED --release--> RELEASED --resumed_received--> DONE   (recovery: release first)
    AWAIT_STREAMS | AWAIT_RECEIPT --moved_by_libvirt--> AWAIT_RESUMED   (live, recovery: the guest
        left A, libvirt's Confirm stopped it: commit over B's receipt)
    any failure before the commit decision is journaled --fail--> ROLLED_BACK (VM runs at A again;
        the one abort Decision, journaled with "aborted", is returned again by every later fail)
    live (``stopped_when_sent``): AWAIT_RECEIPT --fail--> AWAIT_RECEIPT (in doubt: libvirt stopped
        A's copy, B holds it paused; nothing is decided, recovery decides from libvirt's outcome),
        unless the failure is a refused receipt (then ROLLED_BACK)
    a failure after it leaves AWAIT_RESUMED / RELEASED: A never resumes; the decision is sent again

Destination::

    RECEIVING (accepted, receiving: journaled progress)
        cold: --streams_verified--> RECEIVED --restore--> AWAIT_DECISION
        live: --finished_paused--> FINISHED_PAUSED --channels_verified--> AWAIT_DECISION
    AWAIT_DECISION | IN_DOUBT | FINISHED_PAUSED
        --decision_received(commit)--> COMMITTED (journal "commit-received" first) --> RUNNING
        --finish--> FINISHED
    --decision_received(abort)---> DISCARDED   (from RECEIVING / RECEIVED / FINISHED_PAUSED /
        AWAIT_DECISION / IN_DOUBT; ``discard_on_abort`` runs)
    a failure before the receipt exists --fail--> DISCARDED (paused copy + files removed)
    a failure after a receipt was issued (or libvirt's Finish passed) --fail--> IN_DOUBT (neither
        resume nor discard: A may have committed; recovery asks A for its decision)
    COMMITTED --resume--> RUNNING (recovery after a crash between the two)

Exactly one side ever runs the VM: A resumes only while no commit decision is durable, B
resumes only after it holds (and journaled) A's signed commit Decision.

A live move (``migsec.migration.live``) runs the same machines with libvirt in the place of the
data plane: A's "streams sent" is ``digests_sent`` once ``migrateToURI3`` returned (libvirt's
Confirm stopped A's copy); B's "restore" is ``finished_paused`` (libvirt's Finish left the guest
paused, ``VIR_MIGRATE_PAUSED``; B signs and journals a receipt over the channels so far before
libvirt's reply leaves, so a commit can always name one), and the final receipt, over every
channel, follows with ``channels_verified``. Receipts say ``finished-paused`` there.

The machines do no I/O themselves: the hypervisor operations and the journal are injected
callables, and the signed messages (``migsec.protocol`` Receipt / Decision / Resumed, compact
JWS) are returned for the caller to send, e.g. as ``{"t": "receipt", "jws": token}`` CONTROL
records. An illegal move raises UnexpectedMessageError and leaves the state unchanged.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

from migsec.crypto import SigningKey, VerifyingKey, sha256
from migsec.errors import IntegrityError, MigsecError, TicketError, UnexpectedMessageError
from migsec.protocol import Decision, Receipt, Resumed, token_hash
from migsec.protocol.errors import peer_reason
from migsec.transfer.manifest import Manifest

log = logging.getLogger(__name__)

MANIFEST_STREAM = "manifest.json"  # the receipt's name for the manifest's own SHA-256
COLD_RECEIPT = "restored-paused"  # Receipt.state of a cold move: B restored the VM paused
LIVE_RECEIPT = "finished-paused"  # of a live one: libvirt's Finish left it paused at B

Journal = Callable[..., None]  # journal(phase, **fields); must be durable when it returns
Action = Callable[[], object]  # a hypervisor operation; what it returns is ignored
# A hypervisor operation whose result the machine journals with the phase it completes:
# ``resume_vm`` (A) may return how the VM runs again (journaled as ``how`` with "rolled-back"),
# ``release_vm`` (A) and ``restore_paused`` (B) a mapping of fields (with "released" /
# "restored-paused"). Returning None journals nothing more.
Outcome = Callable[[], Any]


class JournalView(Protocol):
    """What ``from_journal`` reads of a journal entry (``migsec.migration.journal.JournalEntry``)."""

    @property
    def migration_id(self) -> str: ...
    @property
    def phase(self) -> str: ...
    @property
    def data(self) -> Mapping[str, Any]: ...
    @property
    def history(self) -> tuple[tuple[str, float], ...]: ...


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def receipt_streams(manifest: Manifest, manifest_json: bytes) -> dict[str, bytes]:
    """What a receipt vouches for: every stream digest, and the manifest's SHA-256."""
    streams = {e.name: bytes.fromhex(e.digest) for e in manifest.streams}
    if MANIFEST_STREAM in streams:
        raise IntegrityError(f"a stream may not be called {MANIFEST_STREAM!r} (reserved for the manifest)")
    streams[MANIFEST_STREAM] = sha256(manifest_json)
    return streams


def _fields(result: Any) -> dict[str, Any]:
    return dict(result) if isinstance(result, Mapping) else {}


def _token(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _live(data: Mapping[str, Any]) -> bool:
    """Whether a journal entry's data is of a live move (its handshake's or its plan's mode)."""
    plan = data.get("plan")
    return data.get("mode") == "live" or (isinstance(plan, Mapping) and plan.get("mode") == "live")


def _digests(streams: Mapping[str, bytes]) -> dict[str, str]:
    return {k: v.hex() for k, v in streams.items()}


class _Machine:
    TRANSITIONS: dict[tuple[str, str], str] = {}

    def __init__(self, state: str) -> None:
        self.state = state

    def _move(self, move: str) -> str:
        nxt = self.TRANSITIONS.get((self.state, move))
        if nxt is None:
            raise UnexpectedMessageError(f"{type(self).__name__}: {move!r} is not allowed in state {self.state}")
        return nxt

    def _note(self, move: str, phase: str, fields: Mapping[str, Any]) -> None:
        """A journaled progress event that keeps (or sets) the state of the table."""
        nxt = self._move(move)
        self._journal(phase, **fields)
        self.state = nxt

    def _journal(self, phase: str, **fields: Any) -> None:  # set by the subclasses
        raise NotImplementedError


# --- A ------------------------------------------------------------------------------------------
AWAIT_STREAMS, AWAIT_RECEIPT, AWAIT_RESUMED, RELEASED, DONE, ROLLED_BACK = (
    "AWAIT_STREAMS", "AWAIT_RECEIPT", "AWAIT_RESUMED", "RELEASED", "DONE", "ROLLED_BACK")


class SourceCommit(_Machine):
    """A's side. ``resume_vm`` runs the VM at A again, ``release_vm`` destroys A's copy.

    ``peer_key`` (B's, as the handshake verified it) may be given later, by ``handshaken`` or,
    in recovery, by setting ``peer_key`` once the recovery session is open. ``transcript_hash``
    is the current session's (``SessionKeys.transcript_hash``), given likewise by ``handshaken``
    and by ``streaming`` after a resume: B's receipt must name the session it was sent on, and
    without a key or a transcript hash no receipt is accepted.

    A live move gives ``receipt_state=LIVE_RECEIPT`` (the Receipt.state B must vouch for) and
    ``stopped_when_sent``: libvirt's Confirm stops A's copy when ``digests_sent`` is called, so a
    failure after it that is not a refused receipt leaves A in doubt instead of resuming.
    """

    TRANSITIONS = {
        (AWAIT_STREAMS, "authorized"): AWAIT_STREAMS,
        (AWAIT_STREAMS, "handshaken"): AWAIT_STREAMS,
        (AWAIT_STREAMS, "suspended"): AWAIT_STREAMS,
        (AWAIT_STREAMS, "streaming"): AWAIT_STREAMS,
        (AWAIT_STREAMS, "streams sent"): AWAIT_RECEIPT,
        (AWAIT_RECEIPT, "saved"): AWAIT_RECEIPT,
        (AWAIT_RECEIPT, "receipt"): AWAIT_RESUMED,
        (AWAIT_STREAMS, "moved by libvirt"): AWAIT_RESUMED,  # live, recovery
        (AWAIT_RECEIPT, "moved by libvirt"): AWAIT_RESUMED,
        (AWAIT_RECEIPT, "in doubt"): AWAIT_RECEIPT,  # live: A's copy stopped, nothing decided
        (AWAIT_RESUMED, "release"): RELEASED,
        (RELEASED, "release"): RELEASED,
        (AWAIT_RESUMED, "resumed"): DONE,
        (RELEASED, "resumed"): DONE,
        (AWAIT_STREAMS, "fail"): ROLLED_BACK,
        (AWAIT_RECEIPT, "fail"): ROLLED_BACK,
        (ROLLED_BACK, "fail"): ROLLED_BACK,
        (AWAIT_RESUMED, "fail"): AWAIT_RESUMED,
        (RELEASED, "fail"): RELEASED,
    }

    def __init__(self, *, migration_id: str, src_did: str, dest_did: str, key: SigningKey,
                 peer_key: VerifyingKey | None, journal: Journal, resume_vm: Outcome, release_vm: Outcome,
                 clock: Callable[[], datetime] = _utc_now, transcript_hash: bytes | None = None,
                 receipt_state: str = COLD_RECEIPT, stopped_when_sent: bool = False) -> None:
        super().__init__(AWAIT_STREAMS)
        self.migration_id, self.src_did, self.dest_did = migration_id, src_did, dest_did
        self._key, self.peer_key, self._clock = key, peer_key, clock
        self.transcript_hash = transcript_hash
        self.receipt_state, self._stopped_when_sent = receipt_state, stopped_when_sent
        self._journal_fn, self._resume_vm, self._release_vm = journal, resume_vm, release_vm
        self._expected: dict[str, bytes] | None = None
        self.decision_token: str | None = None  # the commit Decision, once durable
        self.abort_token: str | None = None  # the abort Decision, once made
        self.receipt_token: str | None = None

    @classmethod
    def from_journal(cls, entry: JournalView, *, src_did: str, key: SigningKey, peer_key: VerifyingKey | None,
                     journal: Journal, resume_vm: Outcome, release_vm: Outcome,
                     clock: Callable[[], datetime] = _utc_now) -> SourceCommit:
        """A's machine in the state its journal ``entry`` says (``migsec recover``).

        A live move's machine is rebuilt without ``stopped_when_sent``: recovery knows from
        libvirt whether A's copy stopped (``moved_by_libvirt``), so its ``fail`` is an abort."""
        machine = cls(migration_id=entry.migration_id, src_did=src_did, dest_did=str(entry.data.get("peer")),
                      key=key, peer_key=peer_key, journal=journal, resume_vm=resume_vm, release_vm=release_vm,
                      clock=clock, receipt_state=LIVE_RECEIPT if _live(entry.data) else COLD_RECEIPT)
        history = {phase for phase, _ in entry.history}
        machine.abort_token = _token(entry.data, "abort_decision")
        if "receipt-received" in history:
            machine.receipt_token = _token(entry.data, "receipt")  # verified when it was journaled
        if "committed" in history:
            machine.decision_token = _token(entry.data, "decision")
            machine.receipt_token = _token(entry.data, "receipt")
            machine.state = {"done": DONE, "released": RELEASED}.get(entry.phase, AWAIT_RESUMED)
        elif entry.phase == "rolled-back":
            machine.state = ROLLED_BACK
        elif "streamed" in history:
            machine.state = AWAIT_RECEIPT  # no digests kept: any receipt now is refused (abort)
        return machine

    def _journal(self, phase: str, **fields: Any) -> None:
        self._journal_fn(phase, **fields)

    @property
    def committed(self) -> bool:
        """True once the commit decision is durable: from then on A must never resume."""
        return self.state in (AWAIT_RESUMED, RELEASED, DONE)  # only reached with the decision journaled

    @property
    def live(self) -> bool:
        return self.receipt_state == LIVE_RECEIPT

    # ---- progress before the streams are sent (journaled, the state stays AWAIT_STREAMS) ----
    def authorized(self, **facts: Any) -> None:
        """A's AZ granted the migration: the journal entry starts, with the facts recovery needs."""
        self._note("authorized", "authorized", facts)

    def handshaken(self, peer_key: VerifyingKey | None = None, *, transcript_hash: bytes | None = None,
                   **fields: Any) -> None:
        """B accepted; ``peer_key`` is B's key as the handshake verified it, ``transcript_hash``
        the session's (neither is journaled)."""
        self._note("handshaken", "handshaken", fields)
        if peer_key is not None:
            self.peer_key = peer_key
        if transcript_hash is not None:
            self.transcript_hash = transcript_hash

    def suspended(self, **fields: Any) -> None:
        self._note("suspended", "suspended", fields)

    def streaming(self, *, transcript_hash: bytes | None = None, **fields: Any) -> None:
        """A transfer attempt starts (again after a resume, on a new session: its
        ``transcript_hash``, not journaled, is the one B's receipt must then name)."""
        self._note("streaming", "streaming", fields)
        if transcript_hash is not None:
            self.transcript_hash = transcript_hash

    def streams_sent(self, manifest: Manifest, manifest_json: bytes) -> None:
        """Every stream was acknowledged; the receipt must vouch for exactly these digests."""
        nxt = self._move("streams sent")
        self._journal("streamed", manifest_sha256=sha256(manifest_json).hex())
        self._expected = receipt_streams(manifest, manifest_json)
        self.state = nxt

    def digests_sent(self, streams: Mapping[str, bytes]) -> None:
        """Live: ``migrateToURI3`` returned and every byte channel ended; the receipt must vouch
        for exactly these digests (each channel's SHA-256 per direction)."""
        nxt = self._move("streams sent")
        self._journal("streamed", digests=_digests(streams))
        self._expected = dict(streams)
        self.state = nxt

    def saved(self, **fields: Any) -> None:
        """The memory image is complete on disk at A (libvirt's save returned)."""
        self._note("saved", "saved", fields)

    def _decision(self, decision: str, **fields: Any) -> str:
        return Decision(migration_id=self.migration_id, src_did=self.src_did, dest_did=self.dest_did,
                        decision=decision, issued_at=self._clock(), **fields).sign(self._key)

    def receipt_received(self, token: str) -> str:
        """Check B's receipt, journal the commit decision durably, return the Decision to send.

        A receipt that does not verify, names another session (transcript hash) or vouches for
        other data leads to ``fail`` (abort).
        """
        nxt = self._move("receipt")
        try:
            if self.peer_key is None:
                raise TicketError("no key of the destination to verify its receipt with")
            if self.transcript_hash is None:
                raise TicketError("no transcript hash of the session to check the receipt against")
            receipt = Receipt.verify(token, self.peer_key, migration_id=self.migration_id)
            if (receipt.src_did, receipt.dest_did) != (self.src_did, self.dest_did):
                raise TicketError(f"receipt is between {receipt.src_did} and {receipt.dest_did}")
            if receipt.transcript_hash != self.transcript_hash:
                raise TicketError("receipt names another session (transcript hash)")
            if receipt.state != self.receipt_state:
                raise IntegrityError(f"receipt says {receipt.state!r}, not {self.receipt_state}")
            if dict(receipt.streams) != self._expected:
                theirs, mine = dict(receipt.streams), self._expected or {}
                differ = sorted(n for n in set(theirs) | set(mine) if theirs.get(n) != mine.get(n))
                raise IntegrityError("receipt vouches for other stream digests than were sent: "
                                     + ", ".join(differ[:8]))
            self._journal("receipt-received", receipt=token)
            decision = self._decision("commit", receipt_hash=token_hash(token))
            self._journal("committed", decision=decision)  # THE point of no return
        except MigsecError as exc:
            self.fail(f"receipt refused: {exc}", code="integrity" if isinstance(exc, IntegrityError) else "aborted",
                      refused=True)
            raise
        self.receipt_token, self.decision_token, self.state = token, decision, nxt
        return decision

    def moved_by_libvirt(self, receipt: str | None = None, *, how: str) -> str:
        """Live, recovery: libvirt's outcome at A says the guest left (its Confirm stopped A's
        copy), so it waits paused at B: commit over B's ``receipt`` (verified with ``peer_key``:
        this migration, these domains, the live state; its digests can no longer be compared),
        or over the one A journaled (None), journal the decision, return it. An abort already
        made stays an abort. Refusing the receipt changes nothing (A's copy is gone): recover
        again."""
        nxt = self._move("moved by libvirt")
        if self.abort_token is not None:
            raise UnexpectedMessageError(f"migration {self.migration_id} was aborted; libvirt's outcome "
                                         "does not undo the abort")
        token = receipt or self.receipt_token
        if token is None:
            raise TicketError("no receipt of the destination to commit over")
        if token != self.receipt_token:
            if self.peer_key is None:
                raise TicketError("no key of the destination to verify its receipt with")
            got = Receipt.verify(token, self.peer_key, migration_id=self.migration_id)
            if (got.src_did, got.dest_did, got.state) != (self.src_did, self.dest_did, self.receipt_state):
                raise TicketError(f"the receipt {self.dest_did} holds is not this {self.receipt_state} move's")
            self._journal("receipt-received", receipt=token)
        decision = self._decision("commit", receipt_hash=token_hash(token))
        self._journal("committed", decision=decision, how=how)  # THE point of no return
        self.receipt_token, self.decision_token, self.state = token, decision, nxt
        return decision

    def release(self) -> None:
        """After the commit, before B confirmed (recovery): release A's copy now."""
        nxt = self._move("release")
        fields = _fields(self._release_vm())
        self._journal("released", **fields)
        self.state = nxt

    def resumed_received(self, token: str) -> None:
        """B runs the VM: release A's copy (unless released already)."""
        nxt = self._move("resumed")
        if self.peer_key is None:
            raise TicketError("no key of the destination to verify its Resumed with")
        resumed = Resumed.verify(token, self.peer_key, migration_id=self.migration_id)
        assert self.decision_token is not None
        if resumed.decision_hash != token_hash(self.decision_token):
            raise TicketError("Resumed answers a different decision")
        if self.state == AWAIT_RESUMED:
            fields = _fields(self._release_vm())
            self._journal("released", **fields)
            self.state = RELEASED
        self._journal("done", resumed=token)
        self.state = nxt

    def fail(self, reason: str, *, code: str = "aborted", refused: bool = False) -> str | None:
        """Something went wrong. Before the commit: abort, resume A, return the abort Decision
        (send it if the link still works); the same Decision is journaled with "aborted" and
        returned again by a later ``fail``. After the commit: A stays stopped; returns the
        commit Decision again for the caller (or ``migsec recover``) to resend. ``reason`` is
        journaled and logged here; the Decision B gets names only ``code`` (peer_reason).
        With ``stopped_when_sent`` (live), a failure awaiting the receipt that is not a refused
        receipt (``refused``) changes nothing and returns None: A's copy is gone, B holds the
        only one paused, recovery decides from libvirt's outcome."""
        if self.state == AWAIT_RECEIPT and self._stopped_when_sent and not refused:
            self.state = self._move("in doubt")
            log.warning("migration %s in doubt after the source copy stopped (%s): the destination holds "
                        "the VM paused; recovery decides", self.migration_id, reason)
            return None
        nxt = self._move("fail")
        if self.state == ROLLED_BACK:  # already aborted: the same decision again
            if self.abort_token is None:  # a journal written before abort decisions were kept
                self.abort_token = self._decision("abort", reason=peer_reason(code), receipt_hash=None)
            return self.abort_token
        if nxt != ROLLED_BACK:
            log.warning("migration %s failed after commit (%s); the VM stays with the destination",
                        self.migration_id, reason)
            return self.decision_token
        if self.abort_token is None:
            self.abort_token = self._decision("abort", reason=peer_reason(code), receipt_hash=None)
        try:
            self._journal("aborted", reason=reason[:1024], abort_decision=self.abort_token)
        except MigsecError as exc:  # no commit is durable, so resuming A is still the safe move
            log.error("migration %s: could not journal the abort: %s", self.migration_id, exc)
        how = self._resume_vm()
        self.state = nxt
        self._journal("rolled-back", **({"how": how} if isinstance(how, str) else {}))
        return self.abort_token


# --- B ------------------------------------------------------------------------------------------
RECEIVING, RECEIVED, AWAIT_DECISION, COMMITTED, RUNNING, FINISHED, DISCARDED, IN_DOUBT = (
    "RECEIVING", "RECEIVED", "AWAIT_DECISION", "COMMITTED", "RUNNING", "FINISHED", "DISCARDED", "IN_DOUBT")
FINISHED_PAUSED = "FINISHED_PAUSED"  # live: libvirt's Finish left the VM paused here; no final receipt yet


class DestinationCommit(_Machine):
    """B's side. ``restore_paused`` restores the VM paused from the received state,
    ``resume_vm`` runs it, ``discard`` destroys any paused copy and removes every file,
    ``cleanup`` (optional) removes what is left once the VM runs here.

    A live move gives ``receipt_state=LIVE_RECEIPT`` and ``discard_on_abort``: what A's abort
    Decision runs instead of ``discard`` (destroy the paused copy libvirt's Finish left, which a
    local failure's ``discard`` only waits for libvirt to drop)."""

    TRANSITIONS = {
        (RECEIVING, "accepted"): RECEIVING,
        (RECEIVING, "receiving"): RECEIVING,
        (RECEIVING, "streams verified"): RECEIVED,
        (RECEIVED, "restore"): AWAIT_DECISION,
        (RECEIVING, "finished"): FINISHED_PAUSED,  # live: libvirt's Finish as the restore
        (FINISHED_PAUSED, "channels verified"): AWAIT_DECISION,
        (FINISHED_PAUSED, "commit"): RUNNING,  # a commit over the receipt journaled at the Finish
        (AWAIT_DECISION, "commit"): RUNNING,
        (IN_DOUBT, "commit"): RUNNING,
        (COMMITTED, "commit"): RUNNING,  # A sent its decision again (recovery)
        (RUNNING, "commit"): RUNNING,
        (FINISHED, "commit"): FINISHED,
        (COMMITTED, "resume"): RUNNING,  # recovery: the decision was durable, the resume not
        (RUNNING, "resume"): RUNNING,
        (RUNNING, "finish"): FINISHED,
        (RECEIVING, "abort"): DISCARDED,
        (RECEIVED, "abort"): DISCARDED,
        (FINISHED_PAUSED, "abort"): DISCARDED,
        (AWAIT_DECISION, "abort"): DISCARDED,
        (IN_DOUBT, "abort"): DISCARDED,
        (DISCARDED, "abort"): DISCARDED,
        (RECEIVING, "fail"): DISCARDED,
        (RECEIVED, "fail"): DISCARDED,
        (AWAIT_DECISION, "fail"): IN_DOUBT,
        (FINISHED_PAUSED, "fail"): IN_DOUBT,
        (IN_DOUBT, "fail"): IN_DOUBT,
        (COMMITTED, "fail"): COMMITTED,
        (RUNNING, "fail"): RUNNING,
    }

    def __init__(self, *, migration_id: str, src_did: str, dest_did: str, transcript_hash: bytes,
                 key: SigningKey, peer_key: VerifyingKey | None, journal: Journal, restore_paused: Outcome,
                 resume_vm: Action, discard: Action, cleanup: Action | None = None,
                 clock: Callable[[], datetime] = _utc_now, receipt_state: str = COLD_RECEIPT,
                 discard_on_abort: Action | None = None) -> None:
        super().__init__(RECEIVING)
        self.migration_id, self.src_did, self.dest_did = migration_id, src_did, dest_did
        self._th, self._key, self.peer_key, self._clock = transcript_hash, key, peer_key, clock
        self._journal_fn, self._restore, self._resume_vm, self._discard = journal, restore_paused, resume_vm, discard
        self._cleanup, self._discard_on_abort = cleanup, discard_on_abort or discard
        self.receipt_state = receipt_state
        self._streams: dict[str, bytes] | None = None
        self.receipt_token: str | None = None
        self.decision_token: str | None = None
        self.resumed_token: str | None = None

    @classmethod
    def from_journal(cls, entry: JournalView, *, dest_did: str, key: SigningKey, peer_key: VerifyingKey | None,
                     journal: Journal, restore_paused: Outcome, resume_vm: Action, discard: Action,
                     cleanup: Action | None = None, clock: Callable[[], datetime] = _utc_now,
                     discard_on_abort: Action | None = None) -> DestinationCommit:
        """B's machine in the state its journal ``entry`` says (``migsec recover``, or A's answer).
        A live move's "received" (journaled with a receipt when libvirt's Finish passed) is in
        doubt like a cold "restored-paused": A may have committed."""
        machine = cls(migration_id=entry.migration_id, src_did=str(entry.data.get("peer")), dest_did=dest_did,
                      transcript_hash=b"", key=key, peer_key=peer_key, journal=journal,
                      restore_paused=restore_paused, resume_vm=resume_vm, discard=discard, cleanup=cleanup,
                      clock=clock, receipt_state=LIVE_RECEIPT if _live(entry.data) else COLD_RECEIPT,
                      discard_on_abort=discard_on_abort)
        history = {phase for phase, _ in entry.history}
        machine.receipt_token = _token(entry.data, "receipt")
        if "commit-received" in history:
            machine.decision_token = _token(entry.data, "decision")
            machine.resumed_token = _token(entry.data, "resumed")
            machine.state = {"done": FINISHED, "resumed": RUNNING}.get(entry.phase, COMMITTED)
        else:
            live_finished = machine.receipt_state == LIVE_RECEIPT and machine.receipt_token is not None
            received = IN_DOUBT if live_finished else RECEIVED
            machine.state = {"discarded": DISCARDED, "restored-paused": IN_DOUBT,
                             "received": received}.get(entry.phase, RECEIVING)
        return machine

    def _journal(self, phase: str, **fields: Any) -> None:
        self._journal_fn(phase, **fields)

    # ---- progress while receiving (journaled, the state stays RECEIVING) ----
    def accepted(self, **facts: Any) -> None:
        """B verified and permitted A's request: the journal entry starts."""
        self._note("accepted", "accepted", facts)

    def receiving(self, **fields: Any) -> None:
        self._note("receiving", "receiving", fields)

    def streams_verified(self, manifest: Manifest, manifest_json: bytes, **fields: Any) -> None:
        """Every stream was written and its digest checked (``receive_streams`` returned).
        ``fields`` are journaled with "received": what a recovery needs to know before the
        restore runs, such as the name the VM will be restored under (a crash between the
        restore and its "restored-paused" must not leave a paused copy nobody can find)."""
        nxt = self._move("streams verified")
        if manifest.migration_id != self.migration_id:
            raise IntegrityError(f"manifest is for migration {manifest.migration_id!r}")
        self._streams = receipt_streams(manifest, manifest_json)
        self._journal("received", manifest_sha256=sha256(manifest_json).hex(), **fields)
        self.state = nxt

    def restore(self) -> str:
        """Restore the VM paused and return the signed Receipt to send to A."""
        nxt = self._move("restore")
        try:
            fields = _fields(self._restore())
            assert self._streams is not None
            receipt = self._receipt(self._streams)
            # From the moment the receipt may leave, A may commit: journal it first.
            self._journal("restored-paused", receipt=receipt, **fields)
        except MigsecError as exc:
            self.fail(f"restore failed: {exc}")
            raise
        self.receipt_token, self.state = receipt, nxt
        return receipt

    def _receipt(self, streams: Mapping[str, bytes]) -> str:
        return Receipt(migration_id=self.migration_id, src_did=self.src_did, dest_did=self.dest_did,
                       streams=dict(streams), transcript_hash=self._th, issued_at=self._clock(),
                       state=self.receipt_state).sign(self._key)

    def finished_paused(self, streams: Mapping[str, bytes], **fields: Any) -> str:
        """Live: libvirt's Finish left the VM paused here (the restore step); call it before its
        reply goes on to A. A's libvirt may then stop A's copy at any moment, so from here a
        failure leaves B in doubt, never discarding. Returns the receipt over the channels so far,
        journaled with "received" (a commit from recovery names it)."""
        nxt = self._move("finished")
        self.state = nxt  # first: a failure to journal must not let a later failure discard
        receipt = self._receipt(streams)
        self.receipt_token = receipt
        self._journal("received", receipt=receipt, **fields)
        return receipt

    def channels_verified(self, streams: Mapping[str, bytes]) -> str:
        """Live: every byte channel ended; sign the receipt over their digests, journal it with
        "restored-paused" (before it may leave), return it."""
        nxt = self._move("channels verified")
        try:
            receipt = self._receipt(streams)
            self._journal("restored-paused", receipt=receipt, digests=_digests(streams))
        except MigsecError as exc:
            self.fail(f"receipt not journaled: {exc}")
            raise
        self._streams, self.receipt_token, self.state = dict(streams), receipt, nxt
        return receipt

    def decision_received(self, token: str) -> str | None:
        """Apply A's signed decision: commit -> journal, resume, return the Resumed message;
        abort -> discard, return None. A decision delivered again gets the same answer."""
        if self.peer_key is None:
            raise TicketError("no key of the source to verify its decision with")
        decision = Decision.verify(token, self.peer_key, migration_id=self.migration_id)
        if (decision.src_did, decision.dest_did) != (self.src_did, self.dest_did):
            raise TicketError(f"decision is between {decision.src_did} and {decision.dest_did}")
        if decision.decision == "abort":
            nxt = self._move("abort")
            if self.state != DISCARDED:
                self._discard_on_abort()
                self._journal("discarded", decision=token)
            self.state = nxt
            return None
        nxt = self._move("commit")
        if self.receipt_token is None or decision.receipt_hash != token_hash(self.receipt_token):
            raise TicketError("commit decision names a different receipt")
        if self.state in (AWAIT_DECISION, IN_DOUBT, FINISHED_PAUSED):
            self._journal("commit-received", decision=token)  # from here B's copy wins
            self.decision_token, self.state = token, COMMITTED
        if self.state == FINISHED:
            self._resume_vm()
            return self.resumed_token or self._resumed(token)
        self._run_here()
        self.state = nxt
        assert self.resumed_token is not None
        return self.resumed_token

    def resume(self) -> str:
        """The commit decision is durable here (recovery): run the VM, return the Resumed message."""
        nxt = self._move("resume")
        self._run_here()
        self.state = nxt
        assert self.resumed_token is not None
        return self.resumed_token

    def _resumed(self, decision_token: str) -> str:
        return Resumed(migration_id=self.migration_id, src_did=self.src_did, dest_did=self.dest_did,
                       decision_hash=token_hash(decision_token), issued_at=self._clock()).sign(self._key)

    def _run_here(self) -> None:
        self._resume_vm()
        if self.resumed_token is None:
            assert self.decision_token is not None
            resumed = self._resumed(self.decision_token)
            self._journal("resumed", resumed=resumed)
            self.resumed_token = resumed
        self.state = RUNNING

    def finish(self) -> None:
        """The VM runs here and A was told: remove what is left, journal "done"."""
        nxt = self._move("finish")
        if self._cleanup is not None:
            self._cleanup()
        self._journal("done")
        self.state = nxt

    def fail(self, reason: str) -> None:
        """Before the receipt exists: discard everything. After: stay IN_DOUBT (never resume,
        never discard) until A's decision is known. After the commit: nothing changes."""
        nxt = self._move("fail")
        if nxt == DISCARDED:
            try:
                self._discard()
            finally:
                self.state = nxt
            self._journal("discarded", reason=reason[:1024])
            return
        if nxt in (COMMITTED, RUNNING):
            log.warning("migration %s failed after the commit decision here (%s); the VM stays here",
                        self.migration_id, reason)
            return
        log.warning("migration %s in doubt after the receipt (%s): waiting for the source's decision",
                    self.migration_id, reason)
        self.state = nxt


def as_control(kind: str, token: str) -> dict[str, Any]:
    """The CONTROL record body that carries a commit message on channel 0."""
    if kind not in ("receipt", "decision", "resumed"):
        raise UnexpectedMessageError(f"unknown commit message kind {kind!r}")
    return {"t": kind, "jws": token}

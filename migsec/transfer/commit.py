"""The commit exchange (DESIGN §3.4) as two small state machines, one per side.

Source (coordinator)::

    AWAIT_STREAMS --streams_sent--> AWAIT_RECEIPT --receipt_received--> AWAIT_RESUMED
        --resumed_received--> DONE
    any failure before the commit decision is journaled --fail--> ROLLED_BACK (VM resumed at A)
    a failure after it leaves AWAIT_RESUMED: A never resumes; the decision is sent again

Destination::

    RECEIVING --streams_verified--> RECEIVED --restore--> AWAIT_DECISION
        --decision_received(commit)--> RUNNING        (journal "commit-received" first)
        --decision_received(abort)---> DISCARDED
    a failure before the receipt exists --fail--> DISCARDED (paused copy + files removed)
    a failure after the receipt was issued --fail--> IN_DOUBT (neither resume nor discard:
        A may have committed; recovery asks A for its decision)

Exactly one side ever runs the VM: A resumes only while no commit decision is durable, B
resumes only after it holds (and journaled) A's signed commit Decision.

A live move (``migsec.daemon.live``) runs the same machines with libvirt in the place of the
data plane: A's "streams sent" is ``digests_sent`` once ``migrateToURI3`` returned (libvirt's
Confirm stopped A's copy, so ``stopped_when_sent``: a failure without a refused receipt leaves A
in doubt instead of resuming); B's "restore" is ``finished_paused`` (libvirt's Finish left the
guest paused, ``VIR_MIGRATE_PAUSED``; B signs and journals a receipt over the channels so far
before libvirt's reply leaves, so a commit can always name one), the final receipt follows
with ``channels_verified``::

    RECEIVING --finished_paused--> FINISHED --channels_verified--> AWAIT_DECISION
    FINISHED --fail--> IN_DOUBT    RECEIVING|FINISHED --decision_received(abort)--> DISCARDED The machines do no
I/O themselves: the hypervisor operations and the journal are injected callables, and the
signed messages (``migsec.protocol`` Receipt / Decision / Resumed, compact JWS) are returned
for the caller to send, e.g. as ``{"t": "receipt", "jws": token}`` CONTROL records.
An illegal move raises UnexpectedMessageError and leaves the state unchanged.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from migsec.crypto import SigningKey, VerifyingKey, sha256
from migsec.errors import IntegrityError, MigsecError, TicketError, UnexpectedMessageError
from migsec.protocol import Decision, Receipt, Resumed, token_hash
from migsec.protocol.errors import peer_reason
from migsec.transfer.manifest import Manifest

log = logging.getLogger(__name__)

MANIFEST_STREAM = "manifest.json"  # the receipt's name for the manifest's own SHA-256

Journal = Callable[..., None]  # journal(phase, **fields); must be durable when it returns
Action = Callable[[], None]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def receipt_streams(manifest: Manifest, manifest_json: bytes) -> dict[str, bytes]:
    """What a receipt vouches for: every stream digest, and the manifest's SHA-256."""
    streams = {e.name: bytes.fromhex(e.digest) for e in manifest.streams}
    if MANIFEST_STREAM in streams:
        raise IntegrityError(f"a stream may not be called {MANIFEST_STREAM!r} (reserved for the manifest)")
    streams[MANIFEST_STREAM] = sha256(manifest_json)
    return streams


class _Machine:
    TRANSITIONS: dict[tuple[str, str], str] = {}

    def __init__(self, state: str) -> None:
        self.state = state

    def _move(self, move: str) -> str:
        nxt = self.TRANSITIONS.get((self.state, move))
        if nxt is None:
            raise UnexpectedMessageError(f"{type(self).__name__}: {move!r} is not allowed in state {self.state}")
        return nxt


# --- A ------------------------------------------------------------------------------------------
AWAIT_STREAMS, AWAIT_RECEIPT, AWAIT_RESUMED, DONE, ROLLED_BACK = (
    "AWAIT_STREAMS", "AWAIT_RECEIPT", "AWAIT_RESUMED", "DONE", "ROLLED_BACK")


class SourceCommit(_Machine):
    """A's side. ``resume_vm`` runs the VM at A again, ``release_vm`` destroys A's copy."""

    TRANSITIONS = {
        (AWAIT_STREAMS, "streams sent"): AWAIT_RECEIPT,
        (AWAIT_RECEIPT, "receipt"): AWAIT_RESUMED,
        (AWAIT_RESUMED, "resumed"): DONE,
        (AWAIT_STREAMS, "fail"): ROLLED_BACK,
        (AWAIT_RECEIPT, "fail"): ROLLED_BACK,
        (AWAIT_RESUMED, "fail"): AWAIT_RESUMED,
    }

    def __init__(self, *, migration_id: str, src_did: str, dest_did: str, key: SigningKey,
                 peer_key: VerifyingKey, journal: Journal, resume_vm: Action, release_vm: Action,
                 clock: Callable[[], datetime] = _utc_now, receipt_state: str = "restored-paused",
                 transcript_hash: bytes | None = None, stopped_when_sent: bool = False) -> None:
        """``receipt_state``: the Receipt.state B must vouch for; ``transcript_hash``: if given,
        the receipt must name this session; ``stopped_when_sent``: A's copy stops when the
        streams are sent (live: libvirt's Confirm), so a failure before a receipt was refused
        leaves A in doubt (recovery decides from libvirt's outcome) instead of resuming."""
        super().__init__(AWAIT_STREAMS)
        self.migration_id, self.src_did, self.dest_did = migration_id, src_did, dest_did
        self._key, self._peer_key, self._clock = key, peer_key, clock
        self._journal, self._resume_vm, self._release_vm = journal, resume_vm, release_vm
        self._receipt_state, self._th, self._stopped_when_sent = receipt_state, transcript_hash, stopped_when_sent
        self._expected: dict[str, bytes] | None = None
        self.decision_token: str | None = None
        self.receipt_token: str | None = None
        self.abort_token: str | None = None  # the abort Decision fail() signed, for the caller to send

    @property
    def committed(self) -> bool:
        """True once the commit decision is durable: from then on A must never resume."""
        return self.decision_token is not None and self.state in (AWAIT_RESUMED, DONE)

    def streams_sent(self, manifest: Manifest, manifest_json: bytes) -> None:
        """Every stream was acknowledged; the receipt must vouch for exactly these digests."""
        nxt = self._move("streams sent")
        self._journal("streamed", manifest_sha256=sha256(manifest_json).hex())
        self._expected = receipt_streams(manifest, manifest_json)
        self.state = nxt

    def digests_sent(self, streams: Mapping[str, bytes]) -> None:
        """Every byte channel ended (live); the receipt must vouch for exactly these digests."""
        nxt = self._move("streams sent")
        self._journal("streamed", digests={k: v.hex() for k, v in streams.items()})
        self._expected = dict(streams)
        self.state = nxt

    def receipt_received(self, token: str) -> str:
        """Check B's receipt, journal the commit decision durably, return the Decision to send.

        A receipt that does not verify or vouches for other data leads to ``fail`` (abort).
        """
        nxt = self._move("receipt")
        try:
            receipt = Receipt.verify(token, self._peer_key, migration_id=self.migration_id)
            if (receipt.src_did, receipt.dest_did) != (self.src_did, self.dest_did):
                raise TicketError(f"receipt is between {receipt.src_did} and {receipt.dest_did}")
            if receipt.state != self._receipt_state:
                raise IntegrityError(f"receipt says {receipt.state!r}, not {self._receipt_state}")
            if self._th is not None and receipt.transcript_hash != self._th:
                raise IntegrityError("receipt names another session (transcript hash)")
            if dict(receipt.streams) != self._expected:
                theirs, mine = dict(receipt.streams), self._expected or {}
                differ = sorted(n for n in set(theirs) | set(mine) if theirs.get(n) != mine.get(n))
                raise IntegrityError("receipt vouches for other stream digests than were sent: "
                                     + ", ".join(differ[:8]))
            self._journal("receipt-received", receipt=token)
            decision = Decision(migration_id=self.migration_id, src_did=self.src_did,
                                dest_did=self.dest_did, decision="commit", issued_at=self._clock(),
                                receipt_hash=token_hash(token)).sign(self._key)
            self._journal("committed", decision=decision)  # THE point of no return
        except MigsecError as exc:
            self.fail(f"receipt refused: {exc}", code="integrity" if isinstance(exc, IntegrityError) else "aborted",
                      refused=True)
            raise
        self.receipt_token, self.decision_token, self.state = token, decision, nxt
        return decision

    def resumed_received(self, token: str) -> None:
        """B runs the VM: release A's copy."""
        nxt = self._move("resumed")
        resumed = Resumed.verify(token, self._peer_key, migration_id=self.migration_id)
        assert self.decision_token is not None
        if resumed.decision_hash != token_hash(self.decision_token):
            raise TicketError("Resumed answers a different decision")
        self._release_vm()
        self._journal("released")
        self._journal("done", resumed=token)
        self.state = nxt

    def fail(self, reason: str, *, code: str = "aborted", refused: bool = False) -> str | None:
        """Something went wrong. Before the commit: abort, resume A, return the abort Decision
        (send it if the link still works; also kept as ``abort_token``). After the commit: A
        stays stopped; returns the commit Decision again for the caller (or ``migsec recover``)
        to resend. ``reason`` is journaled and logged here; the Decision B gets names only
        ``code`` (peer_reason). With ``stopped_when_sent``, a failure while awaiting the receipt
        that is not a refused receipt (``refused``) changes nothing and returns None: A's copy
        is gone, B holds the only one paused, recovery decides."""
        nxt = self._move("fail")
        if nxt == AWAIT_RESUMED:
            log.warning("migration %s failed after commit (%s); the VM stays with the destination",
                        self.migration_id, reason)
            return self.decision_token
        if self.state == AWAIT_RECEIPT and self._stopped_when_sent and not refused:
            log.warning("migration %s in doubt after the source copy stopped (%s): the destination holds "
                        "the VM paused; recovery decides", self.migration_id, reason)
            return None
        try:
            self._journal("aborted", reason=reason[:1024])
        except MigsecError as exc:  # no commit is durable, so resuming A is still the safe move
            log.error("migration %s: could not journal the abort: %s", self.migration_id, exc)
        self._resume_vm()
        self.state = nxt
        self._journal("rolled-back")
        self.abort_token = Decision(migration_id=self.migration_id, src_did=self.src_did, dest_did=self.dest_did,
                                    decision="abort", issued_at=self._clock(), reason=peer_reason(code),
                                    receipt_hash=None).sign(self._key)
        return self.abort_token


# --- B ------------------------------------------------------------------------------------------
RECEIVING, RECEIVED, AWAIT_DECISION, RUNNING, DISCARDED, IN_DOUBT = (
    "RECEIVING", "RECEIVED", "AWAIT_DECISION", "RUNNING", "DISCARDED", "IN_DOUBT")
FINISHED = "FINISHED"  # live: libvirt's Finish left the VM paused here; no receipt yet


class DestinationCommit(_Machine):
    """B's side. ``restore_paused`` restores the VM paused from the received state,
    ``resume_vm`` runs it, ``discard`` destroys any paused copy and removes every file."""

    TRANSITIONS = {
        (RECEIVING, "streams verified"): RECEIVED,
        (RECEIVED, "restore"): AWAIT_DECISION,
        (AWAIT_DECISION, "commit"): RUNNING,
        (AWAIT_DECISION, "abort"): DISCARDED,
        (IN_DOUBT, "commit"): RUNNING,
        (IN_DOUBT, "abort"): DISCARDED,
        (RECEIVING, "fail"): DISCARDED,
        (RECEIVED, "fail"): DISCARDED,
        (AWAIT_DECISION, "fail"): IN_DOUBT,
        (IN_DOUBT, "fail"): IN_DOUBT,
        # A's signed abort before anything was restored here; live: libvirt's Finish as the restore
        (RECEIVING, "abort"): DISCARDED,
        (RECEIVING, "finished"): FINISHED,
        (FINISHED, "channels verified"): AWAIT_DECISION,
        (FINISHED, "abort"): DISCARDED,
        (FINISHED, "commit"): RUNNING,
        (FINISHED, "fail"): IN_DOUBT,
    }

    def __init__(self, *, migration_id: str, src_did: str, dest_did: str, transcript_hash: bytes,
                 key: SigningKey, peer_key: VerifyingKey, journal: Journal, restore_paused: Action,
                 resume_vm: Action, discard: Action, clock: Callable[[], datetime] = _utc_now,
                 receipt_state: str = "restored-paused", discard_on_abort: Action | None = None) -> None:
        """``receipt_state``: the Receipt.state B vouches for; ``discard_on_abort``: what A's abort
        Decision runs instead of ``discard`` (live: destroy the paused copy ``discard`` only waits out)."""
        super().__init__(RECEIVING)
        self.migration_id, self.src_did, self.dest_did = migration_id, src_did, dest_did
        self._th, self._key, self._peer_key, self._clock = transcript_hash, key, peer_key, clock
        self._journal, self._restore, self._resume_vm, self._discard = journal, restore_paused, resume_vm, discard
        self._receipt_state = receipt_state
        self._discard_on_abort = discard_on_abort or discard
        self._streams: dict[str, bytes] | None = None
        self.receipt_token: str | None = None
        self.decision_token: str | None = None

    def streams_verified(self, manifest: Manifest, manifest_json: bytes) -> None:
        """Every stream was written and its digest checked (``receive_streams`` returned)."""
        nxt = self._move("streams verified")
        if manifest.migration_id != self.migration_id:
            raise IntegrityError(f"manifest is for migration {manifest.migration_id!r}")
        self._streams = receipt_streams(manifest, manifest_json)
        self._journal("received", manifest_sha256=sha256(manifest_json).hex())
        self.state = nxt

    def restore(self) -> str:
        """Restore the VM paused and return the signed Receipt to send to A."""
        nxt = self._move("restore")
        try:
            self._restore()
            assert self._streams is not None
            receipt = Receipt(migration_id=self.migration_id, src_did=self.src_did, dest_did=self.dest_did,
                              streams=self._streams, transcript_hash=self._th,
                              issued_at=self._clock(), state=self._receipt_state).sign(self._key)
            # From the moment the receipt may leave, A may commit: journal it first.
            self._journal("restored-paused", receipt=receipt)
        except MigsecError as exc:
            self.fail(f"restore failed: {exc}")
            raise
        self.receipt_token, self.state = receipt, nxt
        return receipt

    def finished_paused(self, streams: Mapping[str, bytes], **fields: Any) -> str:
        """Live: libvirt's Finish left the VM paused here (the restore step); call it before its
        reply goes on to A. A's libvirt may then stop A's copy at any moment, so from here a
        failure leaves B in doubt, never discarding. Returns the receipt over the channels so far
        (journaled: recovery's commit names it)."""
        nxt = self._move("finished")
        self.state = nxt  # first: a failure to journal must not let a later failure discard
        receipt = Receipt(migration_id=self.migration_id, src_did=self.src_did, dest_did=self.dest_did,
                          streams=dict(streams), transcript_hash=self._th, issued_at=self._clock(),
                          state=self._receipt_state).sign(self._key)
        self.receipt_token = receipt
        self._journal("received", receipt=receipt, **fields)
        return receipt

    def channels_verified(self, streams: Mapping[str, bytes]) -> str:
        """Live: every byte channel ended; sign the receipt over their digests, journal it, return it."""
        nxt = self._move("channels verified")
        try:
            receipt = Receipt(migration_id=self.migration_id, src_did=self.src_did, dest_did=self.dest_did,
                              streams=dict(streams), transcript_hash=self._th, issued_at=self._clock(),
                              state=self._receipt_state).sign(self._key)
            self._journal("restored-paused", receipt=receipt, digests={k: v.hex() for k, v in streams.items()})
        except MigsecError as exc:
            self.fail(f"receipt not journaled: {exc}")
            raise
        self._streams, self.receipt_token, self.state = dict(streams), receipt, nxt
        return receipt

    def decision_received(self, token: str) -> str | None:
        """Apply A's signed decision: commit -> journal, resume, return the Resumed message;
        abort -> discard, return None."""
        decision = Decision.verify(token, self._peer_key, migration_id=self.migration_id)
        if (decision.src_did, decision.dest_did) != (self.src_did, self.dest_did):
            raise TicketError(f"decision is between {decision.src_did} and {decision.dest_did}")
        if decision.decision == "abort":
            nxt = self._move("abort")
            self._discard_on_abort()
            self._journal("discarded", decision=token)
            self.state = nxt
            return None
        nxt = self._move("commit")
        if self.receipt_token is None or decision.receipt_hash != token_hash(self.receipt_token):
            raise TicketError("commit decision names a different receipt")
        self._journal("commit-received", decision=token)  # from here B's copy wins
        self.decision_token = token
        self._resume_vm()
        resumed = Resumed(migration_id=self.migration_id, src_did=self.src_did, dest_did=self.dest_did,
                          decision_hash=token_hash(token), issued_at=self._clock()).sign(self._key)
        self._journal("resumed", resumed=resumed)
        self.state = nxt
        return resumed

    def fail(self, reason: str) -> None:
        """Before the receipt exists: discard everything. After: stay IN_DOUBT (never resume,
        never discard) until A's decision is known."""
        nxt = self._move("fail")
        if nxt == DISCARDED:
            try:
                self._discard()
            finally:
                self.state = nxt
            self._journal("discarded", reason=reason[:1024])
            return
        log.warning("migration %s in doubt after the receipt (%s): waiting for the source's decision",
                    self.migration_id, reason)
        self.state = nxt


def as_control(kind: str, token: str) -> dict[str, Any]:
    """The CONTROL record body that carries a commit message on channel 0."""
    if kind not in ("receipt", "decision", "resumed"):
        raise UnexpectedMessageError(f"unknown commit message kind {kind!r}")
    return {"t": kind, "jws": token}

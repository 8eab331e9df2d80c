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
resumes only after it holds (and journaled) A's signed commit Decision. The machines do no
I/O themselves: the hypervisor operations and the journal are injected callables, and the
signed messages (``migsec.protocol`` Receipt / Decision / Resumed, compact JWS) are returned
for the caller to send, e.g. as ``{"t": "receipt", "jws": token}`` CONTROL records.
An illegal move raises UnexpectedMessageError and leaves the state unchanged.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
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
                 clock: Callable[[], datetime] = _utc_now) -> None:
        super().__init__(AWAIT_STREAMS)
        self.migration_id, self.src_did, self.dest_did = migration_id, src_did, dest_did
        self._key, self._peer_key, self._clock = key, peer_key, clock
        self._journal, self._resume_vm, self._release_vm = journal, resume_vm, release_vm
        self._expected: dict[str, bytes] | None = None
        self.decision_token: str | None = None
        self.receipt_token: str | None = None

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

    def receipt_received(self, token: str) -> str:
        """Check B's receipt, journal the commit decision durably, return the Decision to send.

        A receipt that does not verify or vouches for other data leads to ``fail`` (abort).
        """
        nxt = self._move("receipt")
        try:
            receipt = Receipt.verify(token, self._peer_key, migration_id=self.migration_id)
            if (receipt.src_did, receipt.dest_did) != (self.src_did, self.dest_did):
                raise TicketError(f"receipt is between {receipt.src_did} and {receipt.dest_did}")
            if receipt.state != "restored-paused":
                raise IntegrityError(f"receipt says {receipt.state!r}, not restored-paused (a cold move)")
            if dict(receipt.streams) != self._expected:
                raise IntegrityError("receipt vouches for other stream digests than were sent")
            self._journal("receipt-received", receipt=token)
            decision = Decision(migration_id=self.migration_id, src_did=self.src_did,
                                dest_did=self.dest_did, decision="commit", issued_at=self._clock(),
                                receipt_hash=token_hash(token)).sign(self._key)
            self._journal("committed", decision=decision)  # THE point of no return
        except MigsecError as exc:
            self.fail(f"receipt refused: {exc}", code="integrity" if isinstance(exc, IntegrityError) else "aborted")
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

    def fail(self, reason: str, *, code: str = "aborted") -> str | None:
        """Something went wrong. Before the commit: abort, resume A, return the abort Decision
        (send it if the link still works). After the commit: A stays stopped; returns the
        commit Decision again for the caller (or ``migsec recover``) to resend. ``reason`` is
        journaled and logged here; the Decision B gets names only ``code`` (peer_reason)."""
        nxt = self._move("fail")
        if nxt == AWAIT_RESUMED:
            log.warning("migration %s failed after commit (%s); the VM stays with the destination",
                        self.migration_id, reason)
            return self.decision_token
        try:
            self._journal("aborted", reason=reason[:1024])
        except MigsecError as exc:  # no commit is durable, so resuming A is still the safe move
            log.error("migration %s: could not journal the abort: %s", self.migration_id, exc)
        self._resume_vm()
        self.state = nxt
        self._journal("rolled-back")
        return Decision(migration_id=self.migration_id, src_did=self.src_did, dest_did=self.dest_did,
                        decision="abort", issued_at=self._clock(), reason=peer_reason(code),
                        receipt_hash=None).sign(self._key)


# --- B ------------------------------------------------------------------------------------------
RECEIVING, RECEIVED, AWAIT_DECISION, RUNNING, DISCARDED, IN_DOUBT = (
    "RECEIVING", "RECEIVED", "AWAIT_DECISION", "RUNNING", "DISCARDED", "IN_DOUBT")


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
    }

    def __init__(self, *, migration_id: str, src_did: str, dest_did: str, transcript_hash: bytes,
                 key: SigningKey, peer_key: VerifyingKey, journal: Journal, restore_paused: Action,
                 resume_vm: Action, discard: Action, clock: Callable[[], datetime] = _utc_now) -> None:
        super().__init__(RECEIVING)
        self.migration_id, self.src_did, self.dest_did = migration_id, src_did, dest_did
        self._th, self._key, self._peer_key, self._clock = transcript_hash, key, peer_key, clock
        self._journal, self._restore, self._resume_vm, self._discard = journal, restore_paused, resume_vm, discard
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
                              issued_at=self._clock()).sign(self._key)
            # From the moment the receipt may leave, A may commit: journal it first.
            self._journal("restored-paused", receipt=receipt)
        except MigsecError as exc:
            self.fail(f"restore failed: {exc}")
            raise
        self.receipt_token, self.state = receipt, nxt
        return receipt

    def decision_received(self, token: str) -> str | None:
        """Apply A's signed decision: commit -> journal, resume, return the Resumed message;
        abort -> discard, return None."""
        decision = Decision.verify(token, self._peer_key, migration_id=self.migration_id)
        if (decision.src_did, decision.dest_did) != (self.src_did, self.dest_did):
            raise TicketError(f"decision is between {decision.src_did} and {decision.dest_did}")
        if decision.decision == "abort":
            nxt = self._move("abort")
            self._discard()
            self._journal("discarded", decision=token)
            self.state = nxt
            return None
        nxt = self._move("commit")
        assert self.receipt_token is not None
        if decision.receipt_hash != token_hash(self.receipt_token):
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

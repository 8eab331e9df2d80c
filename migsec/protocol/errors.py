"""Finer protocol errors, each below a class of :mod:`migsec.errors`."""
from __future__ import annotations

from migsec.errors import (
    AuthorizationDenied,
    HandshakeError,
    IntegrityError,
    ProtocolError,
    ResumeError,
    StreamRefusedError,
    UnexpectedMessageError,
)


class ReflectionError(UnexpectedMessageError):
    """A message of our own role (or from our own domain) came back to us."""


class KeyBindingError(HandshakeError):
    """A signed handshake body does not verify under the presented certificate.

    This is what a substituted ephemeral key (eA / eB) or a re-signed body looks like.
    """


class ReplayCacheFullError(ProtocolError):
    """The replay cache is full of unexpired entries; refusing rather than forgetting one."""


class RpcFilterError(ProtocolError):
    """A libvirt RPC packet through the migration proxy is malformed, oversize or illegal.

    The filter that raised it is in a terminal error state: the connection must be closed.
    (A well-formed call that is merely not allowed is not an error: it is refused with an
    RPC error reply and reported as a ``Refused`` event.)
    """


# ---- what a peer is told about a failure ------------------------------------------------------
# pyca's rule (Fernet's InvalidToken): the peer learns a code and a fixed text, never the local
# detail (paths, exception classes, library messages), which goes to the local log. Each text
# completes "<peer> refused: ..." / "<peer> aborted: ...". The receiving side reads only the code
# and renders its own text: an unknown code reads as "internal".
PEER_ERRORS: dict[str, str] = {
    "denied": "denied by its policy",
    "capacity": "not enough free capacity there for this VM (resources, limits or concurrent migrations)",
    "conflict": "a file already exists there where the VM's disk would go (a stale copy its administrator "
                "must remove)",
    "bad-request": "what it received is not acceptable (a request or stream it does not expect)",
    "integrity": "data did not match its digest",
    "resume": "the transfer cannot resume from where it stopped",
    "aborted": "the migration was aborted",
    "internal": "an internal error (its migsecd log has the detail)",
}

# AuthorizationDenied.decision -> code; any other decision (Deny, NotApplicable, Indeterminate) is "denied"
_DECISION_CODES = {"Capacity": "capacity", "Conflict": "conflict", "Invalid": "bad-request"}
_CODE_DECISIONS = {"capacity": "Capacity", "conflict": "Conflict", "bad-request": "Invalid"}


def peer_error_code(exc: BaseException) -> str:
    """The code a peer is told for ``exc`` (the exception itself stays local)."""
    if isinstance(exc, AuthorizationDenied):
        return _DECISION_CODES.get(exc.decision, "denied")
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, ResumeError):
        return "resume"
    if isinstance(exc, (ProtocolError, StreamRefusedError)):
        return "bad-request"  # the peer sent something this side refuses (message, stream, size)
    return "internal"


def peer_error_text(code: str) -> str:
    """This side's fixed text for a code (a peer's unknown code reads as "internal")."""
    return PEER_ERRORS.get(code, PEER_ERRORS["internal"])


def peer_reason(exc_or_code: BaseException | str) -> str:
    """The reason string sent to a peer: ``"<code>: <fixed text>"``."""
    code = exc_or_code if isinstance(exc_or_code, str) else peer_error_code(exc_or_code)
    if code not in PEER_ERRORS:
        code = "internal"
    return f"{code}: {PEER_ERRORS[code]}"


def parse_peer_reason(reason: object) -> str:
    """The code in a peer's reason string (``"internal"`` when it names none this side knows)."""
    code = str(reason).split(":", 1)[0].strip() if isinstance(reason, str) else ""
    return code if code in PEER_ERRORS else "internal"


def refusal_decision(code: str) -> str:
    """The AuthorizationDenied.decision for a peer's refusal code (the inverse of the table above)."""
    return _CODE_DECISIONS.get(code, "Deny" if code == "denied" else "Error")

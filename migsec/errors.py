"""One exception tree for migsec.

Every failure migsec reports is a MigsecError. Library exceptions (cryptography,
libvirt, lxml, OSError) are caught in the module that called the library and
re-raised as one of these with ``raise ... from``. ``exit_code`` is what the CLI
exits with when the error reaches it.

Packages may define finer subclasses next to their code, but always below one
of the classes here.
"""
from __future__ import annotations

from typing import Any


class MigsecError(Exception):
    """Root of every error migsec raises on purpose."""

    exit_code = 1


# --- configuration -----------------------------------------------------------
class ConfigError(MigsecError):
    """A configuration file or setting is missing or invalid (names the setting)."""

    exit_code = 2


# --- crypto, keys, tickets ----------------------------------------------------
class CryptoError(MigsecError):
    """A cryptographic operation failed."""


class DecryptionError(CryptoError):
    """AEAD or envelope decryption failed. Deliberately opaque (like Fernet's InvalidToken)."""


class SignatureError(CryptoError):
    """A signature did not verify."""


class KeyLoadError(CryptoError):
    """A key could not be loaded, has the wrong type, or unsafe permissions."""


class TicketError(CryptoError):
    """A ticket (Auth_Tkt, Authr_Tkt, receipt) is invalid."""


class TicketExpiredError(TicketError):
    """A ticket or message is outside its validity window."""


class TicketTamperedError(TicketError):
    """A ticket failed its integrity check (bad MAC or signature)."""


class ReplayError(TicketError):
    """A nonce, ticket or request was seen before."""


# --- PKI ------------------------------------------------------------------------
class CertificateError(MigsecError):
    """A certificate is unusable for the purpose it was presented for."""


class UnknownIssuerError(CertificateError):
    """The certificate does not chain to a trusted CA."""

    exit_code = 3  # a trust refusal, as a denial


class CertificateExpiredError(CertificateError):
    """The certificate is not valid at the time of use."""


class DidMismatchError(CertificateError):
    """The domain id in the certificate differs from the one claimed or expected."""


class CertificateRevokedError(CertificateError):
    """The certificate is on a configured CRL."""


class KeyUsageError(CertificateError):
    """The certificate's key usage or extended key usage does not allow this use."""


# --- protocol ---------------------------------------------------------------------
class ProtocolError(MigsecError):
    """The peer (or local code) broke the migsec protocol."""


class MalformedMessageError(ProtocolError):
    """Bytes could not be decoded into a valid message."""


class FrameTooLargeError(ProtocolError):
    """A frame announced a length above the hard maximum."""


class UnexpectedMessageError(ProtocolError):
    """A message arrived that is not legal in the current state."""


class HandshakeError(ProtocolError):
    """The inter-domain handshake failed (wrong peer, bad binding, reflection)."""


class RecordError(ProtocolError):
    """A data record was rejected."""


class RecordAuthError(RecordError):
    """A record failed AEAD authentication (tampered)."""


class RecordSequenceError(RecordError):
    """A record arrived out of order, twice, or after a gap."""


class TruncatedStreamError(RecordError):
    """A stream ended before its announced end."""


class NonceExhaustedError(RecordError):
    """The record counter would wrap; the session must be re-keyed."""


class IntegrityError(ProtocolError):
    """The SHA-256 of what arrived does not match what was sent."""


# --- authentication / authorization ---------------------------------------------------
class AuthenticationError(MigsecError):
    """The administrator could not be authenticated."""

    exit_code = 3


class AuthorizationDenied(MigsecError):
    """A policy decision point did not permit the action."""

    exit_code = 3

    def __init__(self, message: str, *, where: str = "", decision: str = "Deny") -> None:
        super().__init__(message)
        self.where = where
        self.decision = decision


# --- policy -------------------------------------------------------------------------
class PolicyError(MigsecError):
    """A policy or request could not be loaded or evaluated."""


class PolicySyntaxError(PolicyError):
    """A policy document is malformed or statically invalid."""


class PolicyReferenceError(PolicyError):
    """A policy reference is missing or forms a cycle."""


class RequestSyntaxError(PolicyError):
    """An XACML request (XML or JSON) is malformed."""


class UnsafeXmlError(PolicyError):
    """XML with DTDs, entities or external references was refused."""


# --- virtualization ----------------------------------------------------------------
class VirtError(MigsecError):
    """A libvirt operation failed."""


class DomainNotFoundError(VirtError):
    """No domain with that name or uuid."""


class UnsupportedDeviceError(VirtError):
    """The domain has a device that cannot be migrated this way."""


class MappingError(VirtError):
    """A disk path or network has no mapping at the destination."""


class SaveImageError(VirtError):
    """A save image is unreadable or belongs to another domain."""


class HypervisorUnavailableError(VirtError):
    """libvirt could not be reached."""


class LabError(MigsecError):
    """The lab could not be brought up, used or torn down."""


# --- transfer, commit, audit ------------------------------------------------------------
class TransferError(MigsecError):
    """Moving the VM's data failed."""


class NetworkError(TransferError):
    """The connection to a peer could not be made or broke (the socket call's OSError is the
    cause). These, and only these, are what a transfer resumes after (``RESUMABLE``)."""


class PeerUnreachableError(NetworkError):
    """The peer could not be reached (refused, no route, name unknown, connect timed out)."""


class PeerClosedError(NetworkError):
    """The peer closed the connection before the exchange ended."""


class PeerResetError(NetworkError):
    """Sending to or receiving from the peer failed (reset, broken pipe, network down)."""


class PeerTimeoutError(NetworkError):
    """The peer sent nothing for longer than the exchange allows."""


class StreamRefusedError(TransferError):
    """The receiver refuses a stream the sender opened (a name, kind or size it does not expect)."""


class ResumeError(TransferError):
    """A broken transfer could not be resumed."""


class MigrationFailed(TransferError):
    """The migration failed; ``rolled_back`` says whether the VM runs again at the source."""

    def __init__(self, message: str, *, rolled_back: bool = False) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back
        self.exit_code = 4 if rolled_back else 1


def network_error(exc: OSError, what: str) -> NetworkError:
    """The NetworkError for an ``OSError`` a socket call raised while doing ``what`` (raise it
    ``from exc``); only socket calls may be wrapped so: a local file's OSError is not a network fault."""
    import socket

    detail = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, socket.timeout):
        return PeerTimeoutError(f"{what}: timed out")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return PeerResetError(f"{what}: {detail}")
    if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
        return PeerUnreachableError(f"{what}: {detail}")
    return PeerResetError(f"{what}: {detail}")


class DaemonError(MigsecError):
    """An error migsecd reported to a local client (``migsec.daemon.wire``); carries its exit code and class name."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(str(reply.get("message") or reply.get("error") or "migsecd failed"))
        self.reply = reply
        self.error = str(reply.get("error", "MigsecError"))
        code = reply.get("exit_code", 1)
        self.exit_code = code if isinstance(code, int) and 0 < code < 128 else 1


class JournalError(MigsecError):
    """The migration journal is unreadable or inconsistent."""


class AuditError(MigsecError):
    """The audit ledger could not be written or read."""


class LedgerCorruptError(AuditError):
    """The audit ledger's hash chain or a signature does not verify."""


# A cut connection shows up as one of these, and only these are resumed after; anything else
# (integrity, a refusal, a local disk's OSError) is final.
RESUMABLE: tuple[type[MigsecError], ...] = (NetworkError, TruncatedStreamError)

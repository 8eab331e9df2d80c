"""Domain ids (DIDs), the SAN URI that carries them, and migsec's extended key usage."""
from __future__ import annotations

import re

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from migsec.errors import CertificateError

DID_URI_PREFIX = "urn:migsec:domain:"

# A private EKU under the UUID arc 2.25 (ITU-T X.667: no registration needed). Domain
# certificates carry it and TrustStore requires it, so a TLS or mail certificate from
# the same CA can never pass as a migsec domain certificate.
MIGSEC_DOMAIN_EKU = ObjectIdentifier("2.25.289057889736502061849812156980531227792")

# A DID is a lower-case DNS host name (labels of letters, digits and inner hyphens),
# so it can also appear as a DNSName and in URLs without escaping.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DID_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class InvalidDidError(CertificateError):
    """A domain id is not a lower-case DNS-style name."""

    exit_code = 2


def validate_did(did: str) -> str:
    """Return ``did`` if it is a valid domain id, else raise InvalidDidError naming it."""
    if not isinstance(did, str) or not did:
        raise InvalidDidError("domain id is empty")
    if len(did) > 253 or not _DID_RE.fullmatch(did):
        raise InvalidDidError(
            f"invalid domain id {did!r}: use a lower-case DNS-style name such as cloud-b.example "
            "(letters, digits, hyphens and dots; no leading/trailing hyphen)"
        )
    return did


def did_uri(did: str) -> str:
    return DID_URI_PREFIX + validate_did(did)


def did_from_certificate(cert: x509.Certificate) -> str:
    """The one DID in the certificate's SAN; refuse none, several, or a malformed one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise CertificateError("certificate has no subjectAltName, so no domain id") from exc
    return did_from_san(san)


def did_from_san(san: x509.SubjectAlternativeName) -> str:
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(DID_URI_PREFIX)]
    if len(uris) != 1:
        raise CertificateError(
            f"certificate must name exactly one domain id as a {DID_URI_PREFIX}<did> URI, found {len(uris)}"
        )
    return validate_did(uris[0][len(DID_URI_PREFIX):])

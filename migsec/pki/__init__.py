"""Certificates for migsec domains: a small CA, chain validation, the peer directory."""
from migsec.pki.ca import CertificateAuthority
from migsec.pki.identity import DomainIdentity
from migsec.pki.names import DID_URI_PREFIX, MIGSEC_DOMAIN_EKU, InvalidDidError, did_uri, validate_did
from migsec.pki.peers import Peer, PeerDirectory, PinMismatchError, UnknownPeerError
from migsec.pki.trust import TrustStore, VerifiedPeer

__all__ = [
    "CertificateAuthority",
    "DomainIdentity",
    "DID_URI_PREFIX",
    "MIGSEC_DOMAIN_EKU",
    "InvalidDidError",
    "Peer",
    "PeerDirectory",
    "PinMismatchError",
    "TrustStore",
    "UnknownPeerError",
    "VerifiedPeer",
    "did_uri",
    "validate_did",
]

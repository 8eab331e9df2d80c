"""The hash-chained, signed audit ledger (non-repudiation, DESIGN §3.4).

``Ledger(path, identity).append(kind, migration_id, body, peer_token=, peer_cert_pem=,
peer_did=)`` adds a signed entry; ``Ledger(path).verify(trust_store)`` checks the chain,
every local signature and every stored peer signature.
"""
from migsec.audit.ledger import (GENESIS, SIGNER_KIND, Ledger, LedgerEntry, VerifyReport,
                                 canonical_json, entry_hash)

__all__ = ["GENESIS", "SIGNER_KIND", "Ledger", "LedgerEntry", "VerifyReport", "canonical_json",
           "entry_hash"]

"""What the handshake hands to the record layer."""
from __future__ import annotations

from dataclasses import dataclass, field

from migsec.errors import MalformedMessageError
from migsec.protocol.codec import check_ident

SOURCE = "source"
DESTINATION = "destination"
ROLES = (SOURCE, DESTINATION)


@dataclass(frozen=True)
class SessionKeys:
    """One traffic key per direction, bound to the transcript and the migration.

    ``a_to_b`` protects what the source sends, ``b_to_a`` what the destination sends.
    The keys are never shown by repr.
    """

    migration_id: str
    a_to_b: bytes = field(repr=False)
    b_to_a: bytes = field(repr=False)
    transcript_hash: bytes
    src_did: str
    dest_did: str
    resume_of: str | None = None

    def __post_init__(self) -> None:
        check_ident(self.migration_id, "migration id")
        for name in ("a_to_b", "b_to_a", "transcript_hash"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise MalformedMessageError(f"SessionKeys.{name} must be 32 bytes")
        if self.a_to_b == self.b_to_a:
            raise MalformedMessageError("SessionKeys: the two directions must have different keys")

    def keys_for(self, role: str) -> tuple[bytes, bytes]:
        """``(send_key, receive_key)`` for ``role`` ("source" or "destination")."""
        if role == SOURCE:
            return self.a_to_b, self.b_to_a
        if role == DESTINATION:
            return self.b_to_a, self.a_to_b
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")

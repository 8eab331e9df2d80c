"""Everything a running migsecd holds, built from its Config.

Loading checks every setting the daemon needs and raises ConfigError naming the
setting, so that ``migsecd`` refuses to start with a message an operator can act
on. ``reload()`` (SIGHUP) swaps in new policies and peers atomically: a running
migration keeps the objects it started with.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from migsec.audit import Ledger
from migsec.auth.sk3 import load_or_create_sk3
from migsec.auth.users import UserDatabase
from migsec.errors import ConfigError, MigsecError
from migsec.migration.journal import Journal
from migsec.pki import DomainIdentity, PeerDirectory, TrustStore
from migsec.policy import PDP
from migsec.policy.loader import load_policy_dir
from migsec.protocol import ReplayCache

if TYPE_CHECKING:
    from migsec.config import Config
    from migsec.migration.source import OutgoingMigration

T = TypeVar("T")

log = logging.getLogger("migsecd")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(eq=False)
class Services:
    """The daemon's loaded state, shared by every handler and migration thread.

    Set once by ``load()`` and never reassigned: ``config`` to ``replay``, ``clock`` and the
    locks (``replay``, ``journal`` and ``ledger`` are stateful objects with their own locking).
    Mutable, and only so:

    - ``peers``, ``pdp_source``, ``pdp_destination``: swapped together under ``lock`` by
      ``reload()`` (SIGHUP); a running migration keeps the objects it read at its start.
    - ``running``: the outgoing migrations of this migsecd by id, changed under ``lock``.
    """

    config: Config
    identity: DomainIdentity
    trust: TrustStore
    peers: PeerDirectory
    pdp_source: PDP
    pdp_destination: PDP
    users: UserDatabase
    journal: Journal
    ledger: Ledger
    sk3: bytes
    replay: ReplayCache
    clock: Callable[[], datetime] = utcnow
    lock: threading.RLock = field(default_factory=threading.RLock)
    ledger_lock: threading.Lock = field(default_factory=threading.Lock)
    running: dict[str, OutgoingMigration] = field(default_factory=dict)

    # ---- loading ---------------------------------------------------------------------
    @classmethod
    def load(cls, config: Config, *, clock: Callable[[], datetime] = utcnow) -> "Services":
        identity = _setting("[domain].key / [domain].certificate",
                            lambda: DomainIdentity.load(config.domain.key, config.domain.certificate))
        if identity.did != config.domain.id:
            raise ConfigError(f"[domain].id: {config.domain.id!r} differs from the domain id in "
                              f"{config.domain.certificate} ({identity.did!r})")
        trust = _setting("[domain].trust", lambda: TrustStore.from_files(
            [str(p) for p in config.domain.trust], [str(p) for p in config.domain.crls]))
        state_dir = Path(config.paths.state_dir)
        for setting, d in (("[paths].state_dir", state_dir), ("[paths].state_dir", config.paths.journal_dir),
                           ("[paths].state_dir", config.paths.staging_dir),
                           ("[storage].image_dir", Path(config.storage.image_dir))):
            try:
                Path(d).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{setting}: cannot create {d}: {exc.strerror}") from exc
        os.chmod(state_dir, 0o700)
        journal = _setting("[paths].state_dir (journal)", lambda: Journal(config.paths.state_dir))
        ledger = _setting("[paths].state_dir (ledger)", lambda: Ledger(config.paths.ledger, identity, clock=clock))
        users = _setting("[paths].users", lambda: UserDatabase(config.paths.users))
        sk3 = load_or_create_sk3(Path(config.paths.sk3))
        peers, source, dest = _load_peers_and_policies(config)
        return cls(
            config=config, identity=identity, trust=trust, peers=peers, pdp_source=source,
            pdp_destination=dest, users=users, journal=journal, ledger=ledger, sk3=sk3,
            replay=ReplayCache(clock=clock), clock=clock,
        )

    def reload(self) -> None:
        """(Re)load policies and peers; raises ConfigError and keeps the old ones on failure."""
        peers, source, dest = _load_peers_and_policies(self.config)
        with self.lock:
            self.peers, self.pdp_source, self.pdp_destination = peers, source, dest

    # ---- conveniences ------------------------------------------------------------------
    @property
    def did(self) -> str:
        return self.identity.did

    @property
    def socket_path(self) -> str:
        return str(self.config.listen.control_socket)

    @property
    def socket_mode(self) -> int:
        return self.config.listen.socket_mode

    @property
    def socket_group(self) -> str | None:
        return self.config.listen.socket_group

    @property
    def listen(self) -> tuple[str, int]:
        return self.config.listen.peer_host, self.config.listen.peer_port

    @property
    def listen_description(self) -> str:
        return self.config.listen.peer

    @property
    def max_concurrent(self) -> int:
        return max(1, self.config.limits.max_incoming) + 4

    def audit(self, kind: str, migration_id: str | None = None, *, token: str | None = None,
              peer_token: str | None = None, peer_cert_pem: bytes | None = None,
              peer_did: str | None = None, **fields: object) -> None:
        """Append to the audit ledger: ``token`` is a message we signed, ``peer_token`` one the
        peer signed (kept with the certificate it was made with, so it can be checked later)."""
        body = {k: v for k, v in fields.items() if v is not None}
        if token is not None:
            body["token"] = token
        with self.ledger_lock:
            self.ledger.append(kind, migration_id, body, peer_token=peer_token,
                               peer_cert_pem=peer_cert_pem if peer_token else None,
                               peer_did=peer_did if peer_token else None)


def _load_peers_and_policies(config: Config) -> tuple[PeerDirectory, PDP, PDP]:
    """The peer directory and the (source, destination) PDPs; raises ConfigError.

    ``policy_dir`` holds either ``source/`` and ``destination/`` (one PDP each) or, as
    ``migsec policy init-defaults`` writes it, one policy set that serves both actions
    (``migsec.policy.loader.load_policy_dir``: one root, every policy reachable from it).
    """
    peers = _setting("[paths].peers", lambda: PeerDirectory(config.paths.peers))
    _setting("[paths].peers", peers.list)  # a corrupt directory is refused now, not mid-migration
    policies = _setting("[paths].policy_dir", lambda: load_policy_dir(config.paths.policy_dir))
    source = PDP(policies.source)
    dest = PDP(policies.destination) if policies.split else source
    return peers, source, dest


def _setting(setting: str, build: Callable[[], T]) -> T:
    try:
        return build()
    except ConfigError:
        raise
    except MigsecError as exc:
        raise ConfigError(f"{setting}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{setting}: {exc.strerror or exc}") from exc

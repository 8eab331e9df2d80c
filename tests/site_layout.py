"""The site layout that process-level tests (daemon, ops, hooks, e2e) write a migsecd.toml for.

The domain's files sit at the site root as ``migsec ca issue --out pki`` and
``migsec policy init-defaults policies`` leave them; every such config starts with
the same ``[domain]`` and ``[paths]`` sections, written once here. ``make_site`` builds
a whole host's files (a real CA and domain certificate) for the ops and hooks tests.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from migsec.pki import CertificateAuthority, TrustStore


def domain_and_paths(did: str) -> str:
    """The ``[domain]`` and ``[paths]`` sections for ``did`` (paths relative to the config)."""
    return f"""\
[domain]
id = "{did}"
key = "pki/domain-key.pem"
certificate = "pki/domain-cert.pem"
trust = ["pki/ca-cert.pem"]

[paths]
state_dir = "state"
users = "users.json"
peers = "peers.json"
policy_dir = "policies"
sk3 = "sk3.key"
"""


@dataclass
class Site:
    """One domain's files: ``config`` is a migsecd.toml whose every path is under ``root``."""

    root: Path
    config: Path
    ca: CertificateAuthority
    did: str

    @property
    def ledger(self) -> Path:
        return self.root / "state" / "ledger.jsonl"

    @property
    def trust(self) -> TrustStore:
        return TrustStore.from_pem([self.ca.cert_pem])

    def write_config(self, **tables: str) -> None:
        """Rewrite the config; ``tables`` replace or add whole TOML tables (name -> body)."""
        base = {
            "domain": f'id = "{self.did}"\nkey = "pki/domain-key.pem"\n'
                      f'certificate = "pki/domain-cert.pem"\ntrust = ["pki/ca-cert.pem"]',
            "paths": 'state_dir = "state"\nusers = "users.json"\npeers = "peers.json"\n'
                     'policy_dir = "policies"\nsk3 = "sk3.key"',
            "listen": 'peer = "127.0.0.1:7443"\ncontrol_socket = "run/migsecd.sock"',
            "libvirt": 'uri = "test:///default"',
            "storage": f'image_dir = "{self.root}/images"\n'
                       f'map = {{ "/src/images" = "{self.root}/images" }}',
            "network": 'map = { "default" = "migsec-net" }\nbridge_map = { "br0" = "br1" }',
            "hooks": "allow_native_migration = false",
        }
        base.update(tables)
        self.config.write_text("".join(f"[{name}]\n{body}\n\n" for name, body in base.items()))


def make_site(root: Path, did: str = "cloud-b.example", *, days: int = 365,
              now: dt.datetime | None = None) -> Site:
    ca = CertificateAuthority.create(root / "ca", "Ops Test CA", now=now)
    ca.issue_domain(did, root / "pki", days=days, now=now)
    for sub in ("images", "run", "policies"):
        (root / sub).mkdir(exist_ok=True)
    (root / "state").mkdir(mode=0o700, exist_ok=True)
    site = Site(root=root, config=root / "migsecd.toml", ca=ca, did=did)
    site.write_config()
    return site

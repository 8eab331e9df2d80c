"""A host's migsec setup in a temporary directory: real CA, domain certificate, config, policies."""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from migsec.pki import CertificateAuthority, TrustStore

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "hooks" / "qemu"


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


@pytest.fixture
def site(tmp_path) -> Site:
    return make_site(tmp_path / "site")


def run_hook(site_config: Path | None, *args: str, stdin: bytes = b"",
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run hooks/qemu the way libvirtd does: four arguments, XML on stdin, a minimal env."""
    environ = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    if site_config is not None:
        environ["MIGSEC_CONFIG"] = str(site_config)
    environ.update(env or {})
    return subprocess.run([sys.executable, str(HOOK), *args], input=stdin, capture_output=True,
                          env=environ, cwd="/", timeout=60, check=False)


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777

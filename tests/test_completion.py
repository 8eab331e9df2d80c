"""Shell completion of `migsec` (click's bash protocol, through the real entry point):
libvirt domain names, peer destinations and peer domain ids."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from migsec.pki import CertificateAuthority, PeerDirectory
from site_layout import domain_and_paths

MIGSEC = str(Path(sys.executable).parent / "migsec")


def complete(words: str, config: Path | None = None) -> list[str]:
    env = {**os.environ, "_MIGSEC_COMPLETE": "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split(" ")) - 1)}
    if config is not None:
        env["MIGSEC_CONFIG"] = str(config)
    out = subprocess.run([MIGSEC], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # bash_complete prints "type,value" lines
    return [line.split(",", 1)[1] for line in out.stdout.splitlines() if "," in line]


def test_domains_destinations_and_peers_complete(tmp_path):
    ca = CertificateAuthority.create(tmp_path / "ca", "CA")
    cert = ca.issue_domain("cloud-b.example", tmp_path / "b")
    config = tmp_path / "migsecd.toml"
    config.write_text(domain_and_paths("cloud-a.example") + '\n[libvirt]\nuri = "test:///default"\n')
    PeerDirectory(tmp_path / "peers.json").add("cloud-b.example", "198.18.0.2:7443", cert_pem=cert.read_bytes())
    PeerDirectory(tmp_path / "peers.json").add("cloud-c.example", "198.18.0.3:7443", fingerprint="SHA256:" + "ab" * 32)
    # libvirt's test driver has one domain, "test"
    assert complete("migsec migrate te", config) == ["test"]
    assert complete(f"migsec migrate --config {config} te") == ["test"]
    assert complete("migsec migrate test migsec://cloud-b", config) == ["migsec://cloud-b.example"]
    assert complete("migsec migrate test migsec://198", config) == ["migsec://198.18.0.2:7443",
                                                                    "migsec://198.18.0.3:7443"]
    assert complete("migsec peer del cloud-", config) == ["cloud-b.example", "cloud-c.example"]
    # no configuration: nothing offered, and no error for the shell
    assert complete("migsec peer del cloud-", tmp_path / "none.toml") == []

"""migsecd as a process, outside the lab: start-up checks, sd_notify, SIGHUP, the local
exchange (AS + AZ + PDP) and a dry run through two daemons (handshake, both PDPs, capacity),
with libvirt's test driver standing in for the hypervisor (no guest moves here; the lab
tests in tests/e2e move real ones)."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migsec.audit import Ledger
from migsec.auth.users import UserDatabase
from migsec.pki import CertificateAuthority, PeerDirectory
from site_layout import domain_and_paths

BIN = Path(sys.executable).parent
PASSWORD = "daemon test password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, root: Path, did: str, ca: CertificateAuthority) -> None:
        self.root, self.did = root, did
        self.port = free_port()
        root.mkdir()
        ca.issue_domain(did, root / "pki")
        subprocess.run([BIN / "migsec", "policy", "init-defaults", str(root / "policies"),
                        "--trusted", "cloud-b.example", "--accept-from", "cloud-a.example"],
                       check=True, capture_output=True)
        UserDatabase(root / "users.json", scrypt_n=2**10).add("admin", PASSWORD, roles=["migration-admin"])
        UserDatabase(root / "users.json", scrypt_n=2**10).add("visitor", PASSWORD)
        self.config = root / "migsecd.toml"
        self.socket = root / "d.sock"
        self.write_config()
        self.proc: subprocess.Popen | None = None

    def write_config(self, extra: str = "") -> None:
        self.config.write_text(domain_and_paths(self.did) + f"""
[listen]
peer = "127.0.0.1:{self.port}"
control_socket = "{self.socket}"
[libvirt]
uri = "test:///default"
{extra}""")

    def start(self, notify: str | None = None, **env: str) -> subprocess.Popen:
        environ = {**os.environ, **env}
        if notify:
            environ["NOTIFY_SOCKET"] = notify
        self.proc = subprocess.Popen([BIN / "migsecd", "--config", str(self.config)], env=environ,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self.proc

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.proc.stdout.read()
            if self.socket.exists():
                return
            time.sleep(0.05)
        raise AssertionError("migsecd did not create its socket")

    def migsec(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([BIN / "migsec", *args, "--config", str(self.config)], input=input,
                              capture_output=True, text=True, timeout=60)

    def wait_exit(self) -> str:
        assert self.proc is not None
        out, _ = self.proc.communicate(timeout=30)
        return out

    def stop(self) -> str:
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        return out


@pytest.fixture
def nodes(tmp_path):
    ca = CertificateAuthority.create(tmp_path / "ca", "test CA")
    a = Node(tmp_path / "a", "cloud-a.example", ca)
    b = Node(tmp_path / "b", "cloud-b.example", ca)
    PeerDirectory(a.root / "peers.json").add(b.did, f"127.0.0.1:{b.port}",
                                              cert_pem=(b.root / "pki" / "domain-cert.pem").read_bytes())
    PeerDirectory(b.root / "peers.json").add(a.did, f"127.0.0.1:{a.port}",
                                              cert_pem=(a.root / "pki" / "domain-cert.pem").read_bytes())
    yield a, b
    for n in (a, b):
        n.stop()


def test_ready_reload_and_stop_notifications(nodes, tmp_path):
    a, _ = nodes
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(20)
        a.start(notify=notify_path, JOURNAL_STREAM="8:1234")
        assert notify.recv(100) == b"READY=1"
        assert stat.S_IMODE(a.socket.stat().st_mode) == 0o660
        jobs = a.migsec("jobs")
        assert jobs.returncode == 0 and "no migrations" in jobs.stdout
        watch = a.migsec("jobs", "--watch")  # nothing running: one table, then it returns
        assert watch.returncode == 0 and watch.stdout.count("no migrations") == 1
        refused = a.migsec("jobs", "abort", "0123abcd")
        assert refused.returncode == 1 and "no migration 0123abcd in the journal" in refused.stderr
        # a broken policy on SIGHUP: logged, the old policies stay, the daemon keeps serving
        (a.root / "policies" / "source.xml").write_text("<Policy")
        a.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert a.proc.poll() is None and a.migsec("jobs").returncode == 0
        a.proc.send_signal(signal.SIGTERM)
        assert notify.recv(100) == b"STOPPING=1"
    out = a.wait_exit()
    assert a.proc.returncode == 0
    assert "<3>" in out and "reload failed" in out  # journald priority prefix, no timestamps
    assert not a.socket.exists()


def test_refuses_to_start_naming_the_setting(nodes):
    a, _ = nodes
    key = a.root / "pki" / "domain-key.pem"
    key.chmod(0o644)
    a.start()
    out = a.wait_exit()
    assert a.proc.returncode == 2
    assert "refusing to start" in out and "[domain].key" in out and "BEGIN" not in out
    key.chmod(0o600)
    a.write_config(extra="[limits]\nmax_incoming = 0\n")
    a.start()
    out = a.wait_exit()
    assert a.proc.returncode == 2 and "[limits].max_incoming" in out
    # the policy loader migsecd shares with doctor and `policy check`: a forgotten policy refuses
    a.write_config()
    forgotten = (a.root / "policies" / "source.xml").read_text().replace(
        'PolicyId="urn:migsec:policy:source"', 'PolicyId="urn:example:forgotten"')
    (a.root / "policies" / "forgotten.xml").write_text(forgotten)
    a.start()
    out = a.wait_exit()
    assert a.proc.returncode == 2 and "[paths].policy_dir" in out and "not reachable from the root" in out, out
    assert "urn:example:forgotten (forgotten.xml)" in out


def test_local_exchange_wrong_password_and_policy_denial(nodes):
    a, _ = nodes
    a.start()
    a.wait_ready()
    wrong = a.migsec("migrate", "test", "migsec://cloud-b.example:7443", "--user", "admin",
                     "--password-stdin", "--json", input="nope\n")
    message = json.loads(wrong.stdout)["message"]
    assert wrong.returncode == 3 and "authentication failed for user 'admin'" in message and "wrong password" in message
    unknown = a.migsec("migrate", "test", "migsec://cloud-b.example:7443", "--user", "mallory",
                       "--password-stdin", "--json", input="nope\n")
    assert unknown.returncode == 3  # the same answer as a wrong password: names are not probed
    assert json.loads(unknown.stdout)["message"] == message.replace("'admin'", "'mallory'")
    denied = a.migsec("migrate", "test", "migsec://cloud-b.example:7443", "--user", "visitor",
                      "--password-stdin", "--json", input=PASSWORD + "\n")
    reply = json.loads(denied.stdout)
    assert denied.returncode == 3 and reply["where"] == "source" and "policy" in reply["message"]


def test_dry_run_reaches_the_destinations_capacity_check(nodes):
    """Local exchange, Authr_Tkt, handshake, B's certificate checks and PDP all pass; the test
    driver's 8 GiB domain does not fit the test driver's free memory, and B says so."""
    a, b = nodes
    for n in (a, b):
        n.start()
    for n in (a, b):
        n.wait_ready()
    run = a.migsec("migrate", "test", f"migsec://127.0.0.1:{b.port}", "--user", "admin", "--password-stdin",
                   "--dry-run", "--json", input=PASSWORD + "\n")
    result = json.loads(run.stdout)
    assert run.returncode == 3, result
    assert result["where"] == "destination" and "cloud-b.example refused" in result["message"]
    # A learns B's code (capacity) in its own words; the figures stay in B's log
    assert result["decision"] == "Capacity" and "not enough free capacity" in result["message"], result
    assert "MiB" not in result["message"]
    assert "not enough free memory" in b.stop()
    # both ledgers hold the exchange (B's signed refusal at A, A's signed request at B) and verify
    for n in (a, b):
        check = subprocess.run([BIN / "migsec", "audit", "--config", str(n.config), "verify"],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "peer-signed" in check.stdout
    # A ledgered its own signed MigReq body: the very JWS that B ledgered as A's
    [mine] = [e for e in Ledger(a.root / "state" / "ledger.jsonl").entries() if e.kind == "mig-req"]
    [theirs] = [e for e in Ledger(b.root / "state" / "ledger.jsonl").entries() if e.kind == "mig-req"]
    assert mine.peer is None and mine.body["role"] == "source"
    assert mine.migration_id == theirs.migration_id and mine.body["token"] == theirs.peer["token"]
    assert "no migrations" in a.migsec("jobs").stdout


def test_destination_names_a_truncated_mig_req(nodes):
    """A peer that hangs up mid-MigReq is logged at B as what it is (not as a refusal by B)."""
    _, b = nodes
    b.start()
    b.wait_ready()
    with socket.create_connection(("127.0.0.1", b.port)) as s:
        s.sendall(b"\x01\x00")  # half a frame header
    time.sleep(1)  # B logs it as soon as the connection closes; then stop B and read its log
    out = b.stop()
    assert "before its MigReq was complete" in out, out


@pytest.fixture
def ssh_agent(tmp_path):
    """A real ssh-agent holding a fresh ed25519 key; yields (environment, public key line)."""
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, capture_output=True)
        yield env, (tmp_path / "id_ed25519.pub").read_text()
    finally:
        agent.terminate()
        agent.wait()


def test_ssh_agent_login(nodes, ssh_agent):
    """An ssh-agent user authenticates without a password; the AS checks the agent's signature."""
    a, _ = nodes
    env, public = ssh_agent
    UserDatabase(a.root / "users.json", scrypt_n=2**10).add("keyuser", None, ssh_public_key=public)
    a.start()
    a.wait_ready()
    cmd = [BIN / "migsec", "migrate", "test", "migsec://cloud-b.example:7443", "--user", "keyuser",
           "--ssh-agent", "--json", "--config", str(a.config)]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    reply = json.loads(ok.stdout)
    # authenticated: the request reached the AZ, whose policy denies a user without the role
    assert ok.returncode == 3 and reply["error"] == "AuthorizationDenied" and reply["where"] == "source"
    other = UserDatabase(a.root / "users.json", scrypt_n=2**10)
    other.delete("keyuser")
    other.add("keyuser", PASSWORD)  # same name, no ssh key: the agent's proof must be refused
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3 and json.loads(bad.stdout)["error"] == "AuthenticationError"


def test_destination_that_does_not_trust_the_source(tmp_path):
    """B only trusts its own CA: it drops A's MigReq unanswered, and A says why that happens."""
    ca_a = CertificateAuthority.create(tmp_path / "ca-a", "CA of A")
    ca_b = CertificateAuthority.create(tmp_path / "ca-b", "CA of B")
    a = Node(tmp_path / "a", "cloud-a.example", ca_a)
    b = Node(tmp_path / "b", "cloud-b.example", ca_b)
    # A trusts both CAs (so it accepts B's certificate); B trusts only its own
    a.write_config()
    text = a.config.read_text().replace('trust = ["pki/ca-cert.pem"]',
                                        f'trust = ["pki/ca-cert.pem", "{tmp_path / "ca-b" / "ca-cert.pem"}"]')
    a.config.write_text(text)
    PeerDirectory(a.root / "peers.json").add(b.did, f"127.0.0.1:{b.port}",
                                              cert_pem=(b.root / "pki" / "domain-cert.pem").read_bytes())
    try:
        for n in (a, b):
            n.start()
        for n in (a, b):
            n.wait_ready()
        run = a.migsec("migrate", "test", "migsec://cloud-b.example:7443", "--user", "admin",
                       "--password-stdin", "--dry-run", "--json", input=PASSWORD + "\n")
        reply = json.loads(run.stdout)
        assert run.returncode == 1 and reply["error"] == "HandshakeError", reply
        assert "cloud-b.example" in reply["message"] and "untrusted" in reply["message"]
    finally:
        logs = b.stop()
        a.stop()
    assert "handshake failed" in logs  # B's log has the detail: which certificate, which trust store
    assert "issued by O=migsec,CN=CA of A" in logs and "fingerprint SHA256:" in logs and "[domain].trust" in logs, logs


def test_first_contact_with_pinned_peers_stores_their_certificates(nodes):
    """Both sides know the other only by a pinned fingerprint: A fetches B's certificate, checks
    it against the pin and its trust store and stores it; B stores A's after the MigReq verified."""
    a, b = nodes
    fp_a = subprocess.run([BIN / "migsec", "ca", "show", str(a.root / "pki" / "domain-cert.pem")],
                          capture_output=True, text=True, check=True).stdout
    fp_a = next(line.split()[-1] for line in fp_a.splitlines() if "fingerprint" in line)
    fp_b = PeerDirectory(a.root / "peers.json").get(b.did).fingerprint
    # the suggested replacement works in place (no "already exists")
    r = a.migsec("peer", "add", b.did, "--address", f"127.0.0.1:{b.port}", "--fingerprint", "SHA256:" + "00" * 32,
                 "--replace")
    assert r.returncode == 0 and "replaced peer cloud-b.example" in r.stdout, r.stdout + r.stderr
    PeerDirectory(b.root / "peers.json").add(a.did, f"127.0.0.1:{a.port}", fingerprint=fp_a, replace=True)
    for n in (a, b):
        n.start()
    for n in (a, b):
        n.wait_ready()
    dry = ("migrate", "test", f"migsec://127.0.0.1:{b.port}", "--user", "admin", "--password-stdin", "--dry-run",
           "--json")
    # a wrong pin: B's certificate is fetched, refused (exit 3), and nothing is stored
    run = a.migsec(*dry, input=PASSWORD + "\n")
    reply = json.loads(run.stdout)
    assert run.returncode == 3 and reply["error"] == "PinMismatchError", reply
    assert fp_b in reply["message"] and "nothing was stored" in reply["message"]
    assert PeerDirectory(a.root / "peers.json").get(b.did).cert_pem is None
    # the right pin: stored at A on first contact, and A's at B (the dry run got to B's capacity check)
    a.migsec("peer", "add", b.did, "--address", f"127.0.0.1:{b.port}", "--fingerprint", fp_b, "--replace")
    run = a.migsec(*dry, input=PASSWORD + "\n")
    reply = json.loads(run.stdout)
    assert reply.get("where") == "destination" and reply.get("decision") == "Capacity", reply
    stored_b = PeerDirectory(a.root / "peers.json").get(b.did)
    assert stored_b.cert_pem == (b.root / "pki" / "domain-cert.pem").read_bytes() and stored_b.fingerprint == fp_b
    assert PeerDirectory(b.root / "peers.json").get(a.did).cert_pem == (a.root / "pki" / "domain-cert.pem").read_bytes()
    listed = a.migsec("peer", "list")
    assert "not yet seen" not in listed.stdout and "certificate" in listed.stdout
    kinds = [e.kind for e in Ledger(a.root / "state" / "ledger.jsonl").entries()]
    assert "peer-pinned" in kinds


def test_untrusted_peer_ca_is_exit_3_and_names_the_certificate_and_trust_store(tmp_path):
    """A's peer directory holds a certificate of a CA that A does not trust."""
    ca_a = CertificateAuthority.create(tmp_path / "ca-a", "CA of A")
    rogue = CertificateAuthority.create(tmp_path / "ca-r", "Rogue CA")
    a = Node(tmp_path / "a", "cloud-a.example", ca_a)
    rogue.issue_domain("cloud-b.example", tmp_path / "rogue-b")
    cert = (tmp_path / "rogue-b" / "domain-cert.pem").read_bytes()
    PeerDirectory(a.root / "peers.json").add("cloud-b.example", "127.0.0.1:9", cert_pem=cert)
    try:
        a.start()
        a.wait_ready()
        run = a.migsec("migrate", "test", "migsec://cloud-b.example:7443", "--user", "admin",
                       "--password-stdin", "--dry-run", "--json", input=PASSWORD + "\n")
    finally:
        a.stop()
    reply = json.loads(run.stdout)
    assert run.returncode == 3 and reply["error"] == "UnknownIssuerError", reply
    fp = PeerDirectory(a.root / "peers.json").get("cloud-b.example").fingerprint
    for part in ("cloud-b.example", "Rogue CA", fp, "[domain].trust", str(a.config), "ca-cert.pem"):
        assert part in reply["message"], (part, reply["message"])

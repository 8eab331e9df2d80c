"""`migsec user` through the real click entry point, against a real config and database."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import paramiko
import pytest
from click.testing import CliRunner

from migsec.auth.users import UserDatabase
from migsec.cli import main


@pytest.fixture
def cfg(site, minimal, write_file):
    return write_file(site / "migsecd.toml", minimal)


def run(*args, input=None, env=None):
    return CliRunner().invoke(main, list(args), input=input, env=env)


def test_user_add_list_del(cfg, site):
    r = run("user", "--config", str(cfg), "add", "alice", "--role", "admin", "--role", "ops",
            "--password-stdin", input="pw1 long enough\n")
    assert r.exit_code == 0, r.output
    assert "added user alice (roles: admin, ops; login: password)" in r.output
    db = UserDatabase(site / "users.json")
    assert db.verify_password("alice", "pw1 long enough").roles == ("admin", "ops")
    assert len((site / "sk3.key").read_bytes()) == 32
    assert oct((site / "sk3.key").stat().st_mode & 0o777) == "0o600"

    key = paramiko.ECDSAKey.generate()
    pub = site / "id.pub"
    pub.write_text(f"{key.get_name()} {key.get_base64()} bob@host\n")
    r = run("user", "add", "bob", "--ssh-key", str(pub), "--config", str(cfg))
    assert r.exit_code == 0, r.output
    assert "login: ssh key SHA256:" in r.output

    r = run("user", "list", "--json", env={"MIGSEC_CONFIG": str(cfg)})
    rows = json.loads(r.output)
    assert [(x["name"], x["password"], bool(x["ssh_key"])) for x in rows] == \
        [("alice", True, False), ("bob", False, True)]
    r = run("user", "--config", str(cfg), "list")
    assert "alice" in r.output and "admin,ops" in r.output and "pw1" not in r.output

    assert run("user", "--config", str(cfg), "del", "alice").exit_code == 0
    r = run("user", "--config", str(cfg), "del", "alice")
    assert r.exit_code == 2 and "no user 'alice'" in r.output
    assert [u.name for u in db.list()] == ["bob"]


def test_user_add_errors(cfg, site):
    r = run("user", "--config", str(cfg), "add", "alice")
    assert r.exit_code == 2 and "--password-stdin" in r.output  # no tty to prompt on
    r = run("user", "--config", str(cfg), "add", "alice", "--password-stdin", input="\n")
    assert r.exit_code == 2 and "held no password" in r.output
    r = run("user", "--config", str(cfg), "add", "a b", "--password-stdin", input="long enough password\n")
    assert r.exit_code == 2 and "user name 'a b' is invalid" in r.output
    r = run("user", "--config", str(site / "none.toml"), "list")
    assert r.exit_code == 2 and "configuration file not found" in r.output
    assert not (site / "users.json").exists()


def test_password_minimum_length_is_configurable(site, minimal, write_file):
    cfg = write_file(site / "migsecd.toml", minimal)
    r = run("user", "--config", str(cfg), "add", "alice", "--password-stdin", input="eleven char\n")
    assert r.exit_code == 2 and "too short: 11 characters, at least 12" in r.output, r.output
    assert not (site / "users.json").exists() or "alice" not in UserDatabase(site / "users.json")
    cfg = write_file(site / "migsecd.toml", minimal + "\n[users]\nmin_password_length = 20\n")
    r = run("user", "--config", str(cfg), "add", "alice", "--password-stdin", input="nineteen characters\n")
    assert r.exit_code == 2 and "at least 20" in r.output
    r = run("user", "--config", str(cfg), "add", "alice", "--password-stdin", input="twenty characters!!!\n")
    assert r.exit_code == 0, r.output
    cfg = write_file(site / "migsecd.toml", minimal + "\n[users]\nmin_password_length = 0\n")
    r = run("user", "--config", str(cfg), "list")
    assert r.exit_code == 2 and "[users].min_password_length" in r.output


def test_user_passwd_and_mod(cfg, site):
    db = UserDatabase(site / "users.json")
    assert run("user", "--config", str(cfg), "add", "alice", "--role", "admin", "--password-stdin",
               input="first password 1\n").exit_code == 0
    r = run("user", "--config", str(cfg), "passwd", "alice", "--password-stdin", input="short\n")
    assert r.exit_code == 2 and "too short" in r.output
    db.verify_password("alice", "first password 1")  # unchanged
    r = run("user", "--config", str(cfg), "passwd", "alice", "--password-stdin", input="second password 2\n")
    assert r.exit_code == 0 and "changed the password of user alice" in r.output
    db.verify_password("alice", "second password 2")
    with pytest.raises(Exception, match="authentication failed for user 'alice'"):
        db.verify_password("alice", "first password 1")
    r = run("user", "--config", str(cfg), "passwd", "nobody", "--password-stdin", input="second password 2\n")
    assert r.exit_code == 2 and "no user 'nobody'" in r.output

    r = run("user", "--config", str(cfg), "mod", "alice", "--add-role", "ops", "--add-role", "audit")
    assert r.exit_code == 0 and "roles: admin, ops, audit" in r.output, r.output
    r = run("user", "--config", str(cfg), "mod", "alice", "--del-role", "admin")
    assert r.exit_code == 0 and db.get("alice").roles == ("ops", "audit")
    r = run("user", "--config", str(cfg), "mod", "alice", "--del-role", "nope")
    assert r.exit_code == 2 and "has no role 'nope'" in r.output
    r = run("user", "--config", str(cfg), "mod", "alice", "--role", "viewer")
    assert r.exit_code == 0 and db.get("alice").roles == ("viewer",)
    r = run("user", "--config", str(cfg), "mod", "alice", "--no-password")
    assert r.exit_code == 2 and "no way to log in" in r.output
    assert db.get("alice").password is not None
    key = paramiko.ECDSAKey.generate()
    pub = site / "id.pub"
    pub.write_text(f"{key.get_name()} {key.get_base64()} alice@host\n")
    r = run("user", "--config", str(cfg), "mod", "alice", "--ssh-key", str(pub), "--no-password", "--no-roles")
    assert r.exit_code == 0 and "login: ssh key SHA256:" in r.output and "roles: none" in r.output, r.output
    alice = db.get("alice")
    assert alice.password is None and alice.ssh_public_key and alice.roles == ()
    r = run("user", "--config", str(cfg), "mod", "alice")
    assert r.exit_code == 2 and "nothing to change" in r.output


def test_user_add_prompts_twice_on_a_tty(cfg, site):
    pid, fd = pty.fork()
    if pid == 0:  # child: the real CLI on a real terminal
        os.execv(sys.executable, [sys.executable, "-m", "migsec.cli", "user", "--config",
                                  str(cfg), "add", "tty-user", "--role", "admin"])
    out = b""
    answers = [b"Password for tty-user", b"Repeat the password"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
        if answers and answers[0] in out:
            answers.pop(0)
            os.write(fd, b"tty-secret-123\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"tty-secret-123" not in out  # hidden input
    assert UserDatabase(site / "users.json").verify_password("tty-user", "tty-secret-123")


@pytest.fixture(scope="module")
def peer_certs(tmp_path_factory):
    from migsec.pki import CertificateAuthority

    root = tmp_path_factory.mktemp("peer-pki")
    ca = CertificateAuthority.create(root / "ca", "Test CA")
    return {did: ca.issue_domain(did, root / did) for did in ("cloud-b.example", "cloud-c.example")}


def test_peer_add_list_del(cfg, site, peer_certs):
    from migsec.pki import PeerDirectory

    b_cert = peer_certs["cloud-b.example"]
    r = run("peer", "--config", str(cfg), "add", "cloud-b.example", "--address",
            "198.18.0.2:7443", "--cert", str(b_cert))
    assert r.exit_code == 0, r.output
    assert "added peer cloud-b.example at migsec://198.18.0.2:7443 (certificate SHA256:" in r.output
    fp = "SHA256:" + "ab" * 32
    r = run("peer", "add", "cloud-c.example", "--address", "198.18.0.3:7443",
            "--fingerprint", fp, "--config", str(cfg))
    assert r.exit_code == 0, r.output
    peers = PeerDirectory(site / "peers.json").list()
    assert [(p.did, p.cert_pem is not None, p.fingerprint) for p in peers] == \
        [("cloud-b.example", True, peers[0].fingerprint), ("cloud-c.example", False, fp)]
    assert peers[0].cert_pem == b_cert.read_bytes()

    r = run("peer", "--config", str(cfg), "list")
    assert "cloud-b.example" in r.output and "certificate" in r.output
    assert f"pinned {fp}" in r.output
    rows = json.loads(run("peer", "--config", str(cfg), "list", "--json").output)
    assert [x["did"] for x in rows] == ["cloud-b.example", "cloud-c.example"]
    # a pinned peer's certificate given later: "already exists" names --replace, which works
    c_cert = peer_certs["cloud-c.example"]
    r = run("peer", "--config", str(cfg), "add", "cloud-c.example", "--address", "198.18.0.3:7443",
            "--cert", str(c_cert))
    assert r.exit_code == 2 and "already exists" in r.output and "--replace" in r.output, r.output
    r = run("peer", "--config", str(cfg), "add", "cloud-c.example", "--address", "198.18.0.3:7443",
            "--cert", str(c_cert), "--fingerprint", fp, "--replace")
    assert r.exit_code == 3 and "not the given" in r.output  # cert and pin disagree: nothing replaced
    assert PeerDirectory(site / "peers.json").get("cloud-c.example").cert_pem is None
    r = run("peer", "--config", str(cfg), "add", "cloud-c.example", "--address", "198.18.0.4:7443",
            "--cert", str(c_cert), "--replace")
    assert r.exit_code == 0 and "replaced peer cloud-c.example at migsec://198.18.0.4:7443" in r.output
    assert PeerDirectory(site / "peers.json").get("cloud-c.example").cert_pem == c_cert.read_bytes()

    assert run("peer", "--config", str(cfg), "del", "cloud-c.example").exit_code == 0
    r = run("peer", "--config", str(cfg), "del", "cloud-c.example")
    assert r.exit_code == 2 and "no peer 'cloud-c.example'" in r.output


@pytest.mark.parametrize("args, problem", [
    (["cloud-b.example", "--address", "h:1"], "give --cert FILE or --fingerprint"),
    (["cloud-b.example", "--address", "h:1", "--fingerprint", "md5:00"], "SHA256:<64 hex"),
    (["Cloud_B", "--address", "h:1", "--fingerprint", "SHA256:" + "00" * 32], "invalid domain id"),
    (["cloud-b.example", "--address", "ftp://h:1", "--fingerprint", "SHA256:" + "00" * 32],
     "migsec://host:port"),
    (["cloud-c.example", "--address", "h:1", "--cert", "CERT_B"], "not 'cloud-c.example'"),
])
def test_peer_add_errors(cfg, site, peer_certs, args, problem):
    args = [str(peer_certs["cloud-b.example"]) if a == "CERT_B" else a for a in args]
    r = run("peer", "--config", str(cfg), "add", *args)
    assert r.exit_code != 0 and problem in r.output, r.output
    assert not (site / "peers.json").exists()

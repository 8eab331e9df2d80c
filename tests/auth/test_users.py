"""UserDatabase: scrypt verifiers (never the password), roles, ssh keys, file safety."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import threading

import paramiko
import pytest

from migsec.auth.users import UserDatabase, UserError, parse_ssh_public_key
from migsec.crypto.kdf import scrypt_key
from migsec.errors import AuthenticationError, ConfigError

FAST_N = 2**10  # scrypt cost for tests; the default (2**15) is covered once below


@pytest.fixture
def db(tmp_path):
    return UserDatabase(tmp_path / "etc/users.json", scrypt_n=FAST_N)


def ssh_line(key: paramiko.PKey, comment: str = "admin@host") -> str:
    return f"{key.get_name()} {key.get_base64()} {comment}"


def test_password_is_stored_as_scrypt_verifier_only(db):
    db.add("alice", "correct horse", roles=["admin", "operator"])
    raw = db.path.read_bytes()
    assert b"correct horse" not in raw
    entry = json.loads(raw)["users"]["alice"]
    pw = entry["password"]
    assert pw["kdf"] == "scrypt" and pw["n"] == FAST_N
    # the stored key is what a client derives from the password and salt (SK1)
    user = db.get("alice")
    assert user.password.key == scrypt_key("correct horse", user.password.salt, n=FAST_N)
    assert user.roles == ("admin", "operator")
    assert "key" not in repr(user.password).lower().replace("passwordverifier", "")
    assert stat.S_IMODE(db.path.stat().st_mode) == 0o600


def test_verify_password(db):
    db.add("alice", "s3cret", roles=["admin"])
    assert db.verify_password("alice", "s3cret").name == "alice"
    for name, password in [("alice", "s3creT"), ("alice", ""), ("bob", "s3cret")]:
        with pytest.raises(AuthenticationError, match="authentication failed"):
            db.verify_password(name, password)


def test_default_scrypt_cost(tmp_path):
    db = UserDatabase(tmp_path / "users.json")
    db.add("carol", "pw", roles=[])
    assert db.get("carol").password.n == 2**15
    assert db.verify_password("carol", "pw")


def test_same_password_gets_different_salts(db):
    db.add("a", "pw", roles=[])
    db.add("b", "pw", roles=[])
    assert db.get("a").password.salt != db.get("b").password.salt
    assert db.get("a").password.key != db.get("b").password.key


def test_add_delete_list(db):
    assert db.list() == []
    db.add("bob", "x", roles=["operator"])
    db.add("alice", "y", roles=[])
    assert [u.name for u in db.list()] == ["alice", "bob"]
    assert "bob" in db
    with pytest.raises(UserError, match="already exists"):
        db.add("bob", "z", roles=[])
    db.delete("bob")
    assert [u.name for u in db.list()] == ["alice"]
    with pytest.raises(UserError, match="no user 'bob'"):
        db.delete("bob")
    with pytest.raises(UserError, match="no user 'bob'"):
        db.get("bob")


@pytest.mark.parametrize("kwargs, problem", [
    (dict(name="-x", password="p"), "user name"),
    (dict(name="a/b", password="p"), "user name"),
    (dict(name="a", password="p", roles=["ad min"]), "role"),
    (dict(name="a", password="p", roles=["r", "r"]), "twice"),
    (dict(name="a"), "needs a password or an ssh public key"),
    (dict(name="a", password=""), "empty"),
    (dict(name="a", ssh_public_key="ssh-ed25519 notbase64!"), "not a valid OpenSSH"),
    (dict(name="a", ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAA"), "not a valid"),
    (dict(name="a", ssh_public_key="a\nb"), "one line"),
])
def test_bad_input_is_refused(db, kwargs, problem):
    kwargs.setdefault("roles", [])
    with pytest.raises(UserError, match=problem):
        db.add(**kwargs)
    assert not db.path.exists()


def test_ssh_signature_from_a_key(db):
    key = paramiko.ECDSAKey.generate()
    db.add("ops", ssh_public_key=ssh_line(key), roles=["admin"])
    user = db.get("ops")
    assert user.password is None and user.ssh_fingerprint.startswith("SHA256:")
    sig = key.sign_ssh_data(b"AuthReq|ops|nonce").asbytes()
    assert db.verify_ssh_signature("ops", b"AuthReq|ops|nonce", sig).name == "ops"
    with pytest.raises(AuthenticationError, match="ssh-agent authentication failed"):
        db.verify_ssh_signature("ops", b"AuthReq|ops|other", sig)
    with pytest.raises(AuthenticationError):
        db.verify_ssh_signature("ops", b"AuthReq|ops|nonce", b"garbage")
    other = paramiko.ECDSAKey.generate()
    with pytest.raises(AuthenticationError):
        db.verify_ssh_signature("ops", b"x", other.sign_ssh_data(b"x").asbytes())
    with pytest.raises(AuthenticationError):
        db.verify_password("ops", "anything")  # no password registered


@pytest.mark.skipif(not shutil.which("ssh-agent") or not shutil.which("ssh-keygen"),
                    reason="needs OpenSSH's ssh-agent and ssh-keygen")
def test_ssh_signature_made_by_a_real_ssh_agent(db, tmp_path, monkeypatch):
    keyfile = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops@lab",
                    "-f", str(keyfile)], check=True)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            threading.Event().wait(0.05)
        env = dict(os.environ, SSH_AUTH_SOCK=str(sock))
        subprocess.run(["ssh-add", "-q", str(keyfile)], env=env, check=True,
                       stderr=subprocess.DEVNULL)
        db.add("ops", ssh_public_key=(tmp_path / "id_ed25519.pub").read_text(), roles=["admin"])
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        agent_conn = paramiko.Agent()
        try:
            (agent_key,) = agent_conn.get_keys()
            sig = agent_key.sign_ssh_data(b"challenge")  # wire-format bytes
        finally:
            agent_conn.close()
        assert db.verify_ssh_signature("ops", b"challenge", sig).name == "ops"
        with pytest.raises(AuthenticationError):
            db.verify_ssh_signature("ops", b"challengf", sig)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(5)


def test_parse_ssh_public_key_normalises():
    key = paramiko.ECDSAKey.generate()
    assert parse_ssh_public_key("  " + ssh_line(key) + "\n") == ssh_line(key)


def test_unsafe_or_corrupt_file_is_refused(db):
    db.add("alice", "pw", roles=[])
    os.chmod(db.path, 0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        db.list()
    os.chmod(db.path, 0o600)
    db.path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        db.get("alice")
    db.path.write_text(json.dumps({"version": 1, "users": {"alice": {"password": {"kdf": "md5"}}}}))
    with pytest.raises(ConfigError, match="unknown password kdf"):
        db.get("alice")
    db.path.write_text(json.dumps({"users": {}}))
    with pytest.raises(ConfigError, match="not a migsec user database"):
        db.list()


def test_concurrent_adds_from_threads_lose_nothing(db):
    errors = []

    def add(i):
        try:
            UserDatabase(db.path, scrypt_n=FAST_N).add(f"u{i}", "pw", roles=[])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(u.name for u in db.list()) == sorted(f"u{i}" for i in range(8))
    assert not [p for p in db.path.parent.iterdir() if p.name.endswith(".tmp")]

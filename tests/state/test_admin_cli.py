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
            "--password-stdin", input="pw1\n")
    assert r.exit_code == 0, r.output
    assert "added user alice (roles: admin, ops; login: password)" in r.output
    db = UserDatabase(site / "users.json")
    assert db.verify_password("alice", "pw1").roles == ("admin", "ops")
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
    r = run("user", "--config", str(cfg), "add", "a b", "--password-stdin", input="x\n")
    assert r.exit_code == 2 and "user name 'a b' is invalid" in r.output
    r = run("user", "--config", str(site / "none.toml"), "list")
    assert r.exit_code == 2 and "configuration file not found" in r.output
    assert not (site / "users.json").exists()


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
            os.write(fd, b"tty-secret\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"tty-secret" not in out  # hidden input
    assert UserDatabase(site / "users.json").verify_password("tty-user", "tty-secret")

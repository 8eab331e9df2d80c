"""The end-to-end lab: two libvirt hosts, two domains, two migsecd, one session, always torn down."""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import sys

import pytest

# `tests.e2e.*` must import however pytest was started (plain `pytest` puts only this dir on the path)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from migsec.lab import Lab  # noqa: E402
from tests.e2e.deploy import ADMIN, ADMIN_PASSWORD, Deployment, deploy  # noqa: E402

GUEST_MEMORY = "128M"
GUEST_REGION_MIB = 16
GUEST_DISK = "64M"


LOG_TAIL = 40


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed lab test carries the end of both migsecd logs (the lab, logs and all, is torn
    down after the session, so the report is all that is left of them)."""
    outcome = yield
    report = outcome.get_result()
    deployment = item.funcargs.get("dep") if report.when == "call" and report.failed else None
    for name, domain in getattr(deployment, "domains", {}).items():
        try:
            tail = domain.log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        except OSError as exc:
            tail = [f"(cannot read {domain.log}: {exc})"]
        report.sections.append((f"migsecd at {name}, last {LOG_TAIL} lines", "\n".join(tail)))


@pytest.fixture(scope="session")
def dep(tmp_path_factory):
    """The lab up, CA + cloud-a/cloud-b deployed, both migsecd running inside their hosts."""
    lab = Lab(tmp_path_factory.mktemp("e2e"), "e" + secrets.token_hex(3))
    deployment: Deployment | None = None
    try:
        lab.up(2, guest=None, timeout=120)
        deployment = deploy(lab)
        deployment.start()
        yield deployment
    finally:
        try:
            if deployment is not None:
                deployment.stop()
        finally:
            lab.down()


class GuestHandle:
    """A test guest and what its console said."""

    def __init__(self, dep: Deployment, name: str) -> None:
        self.dep = dep
        self.name = name
        self.seed = name

    def log(self, host: str) -> Path:
        return self.dep.lab.host(host).console_log(self.name)

    def console(self, host: str):
        from migsec.lab import parse_console

        return parse_console(self.log(host))

    def state(self, host: str) -> str:
        out = self.dep.lab.host(host).virsh("domstate", self.name, check=False).strip()
        return out or "absent"

    def wait_counter_beyond(self, host: str, value: int, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counters = self.console(host).counters
            if counters and counters[-1] > value:
                return counters[-1]
            time.sleep(0.3)
        raise AssertionError(f"{self.name} on {host}: counter did not pass {value} within {timeout} s")

    def assert_runs_only_on(self, host: str) -> None:
        other = "b" if host == "a" else "a"
        assert self.state(host) == "running", f"{self.name} is {self.state(host)} on {host}"
        assert self.state(other) != "running", f"{self.name} also runs on {other}"
        self.wait_counter_beyond(host, 0)  # a guest resumed just now may not have counted there yet
        before = self.console(host).counters[-1]
        self.wait_counter_beyond(host, before)


@pytest.fixture
def guest(dep, request):
    """A fresh small guest booted on host a (its own name per test)."""
    name = "g" + secrets.token_hex(3)
    dep.lab.ensure_guest("a", name, memory=GUEST_MEMORY, disk_size=GUEST_DISK, region_mib=GUEST_REGION_MIB,
                         timeout=120)
    handle = GuestHandle(dep, name)
    handle.wait_counter_beyond("a", 3)
    yield handle
    for host in ("a", "b"):
        h = dep.lab.host(host)
        h.virsh("destroy", name, check=False)
        h.virsh("undefine", name, check=False)


def migrate(dep: Deployment, name: str, *extra: str, user: str = ADMIN, password: str = ADMIN_PASSWORD,
            destination: str | None = None, timeout: float = 300):
    """``migsec migrate NAME migsec://B`` on host a; returns (exit code, parsed --json output, stderr)."""
    a, b = dep["a"], dep["b"]
    dest = destination or f"migsec://{b.address}:7443"
    proc = a.migsec("migrate", name, dest, "--json", "--user", user, "--password-stdin",
                    "--config", str(a.config), *extra, input=password + "\n", timeout=timeout)
    try:
        result = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        result = {"raw": proc.stdout}
    return proc.returncode, result, proc.stderr


def recovery_outcomes(daemon, rec) -> list[str]:
    """What recovery did for a restarted migsecd: the outcomes of ``migsec recover --json``
    (``rec``) and of migsecd's own automatic pass at start (its ``recovered`` ledger entries),
    whichever of the two ran first."""
    from migsec.audit import Ledger

    automatic = [e.body["outcome"] for e in Ledger(daemon.base / "state" / "ledger.jsonl").entries()
                 if e.kind == "recovered"]
    return [action["outcome"] for action in json.loads(rec.stdout)] + automatic

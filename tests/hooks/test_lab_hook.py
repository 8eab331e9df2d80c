"""The hook in a real libvirtd: hosts a and b of the lab get hooks/qemu before their libvirtds start.

- libvirt's own migration a -> b (``virsh migrate``, client-driven: virsh talks to both
  libvirtds over their unix sockets, QEMU streams over the lab network) is refused by the
  hook in b's prepare phase, audited in b's ledger; with ``allow_native_migration`` the same
  command goes through, so the refusal is the hook's doing;
- ``migsec migrate`` a -> b works with the hook in place (it restores through libvirt, the
  hook sees migsecd's already-mapped XML and lifecycle events land in the same ledger);
- ``virsh restore`` on b of a save image made on a (files moved to b's image directory) is
  mapped by the hook: libvirt restores the guest on b's paths and its counter goes on;
- after ``migsec migrate`` without ``--undefinesource`` the definition a keeps is marked as
  given away: ``virsh start`` there is refused until ``migsec release``, and a migration back
  to a clears the mark.
"""
from __future__ import annotations

import json
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest

from migsec.audit import Ledger
from migsec.lab import Lab, parse_console
from migsec.ops.layout import Layout, apply, plan

pytestmark = [pytest.mark.lab, pytest.mark.slow]

GUEST = dict(memory="128M", disk_size="64M", region_mib=16, timeout=180)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tests.e2e.deploy import deploy

    from migsec.lab.lab import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    lab = Lab(tmp_path_factory.mktemp("hooklab"), "h" + secrets.token_hex(3))
    dep = None
    try:
        # a host's /etc/libvirt is <lab>/<host>/etc: install there before its libvirtd starts
        for host in ("a", "b"):
            layout = Layout(prefix=Path(sys.prefix), config_dir=lab.dir / host / "migsec",
                            hooks_dir=lab.dir / host / "etc" / "hooks")
            apply([i for i in plan(layout) if i.path.is_relative_to(layout.hooks_dir)])
        lab.up(2, guest=None, timeout=120)
        dep = deploy(lab)
        dep.start()
        yield lab, dep
    finally:
        if dep is not None:
            dep.stop()
        lab.down()


def boot(lab: Lab, name: str) -> None:
    lab.ensure_guest("a", name, **GUEST)
    wait_counter(lab, "a", name, 2)


def wait_counter(lab: Lab, host: str, name: str, beyond: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counters = parse_console(lab.host(host).console_log(name)).counters
        if counters and counters[-1] > beyond:
            return counters[-1]
        time.sleep(0.3)
    raise AssertionError(f"{name} on {host}: counter did not pass {beyond} in {timeout} s")


def state(lab: Lab, host: str, name: str) -> str:
    return lab.host(host).virsh("domstate", name, check=False).strip() or "absent"


def ledger_b(dep) -> Ledger:
    return Ledger(dep["b"].base / "state" / "ledger.jsonl")


def ledger_of(dep, host: str) -> Ledger:
    return Ledger(dep[host].base / "state" / "ledger.jsonl")


def libvirt_version(lab: Lab) -> tuple[int, int]:
    out = lab.host("a").virsh("version")
    line = next(ln for ln in out.splitlines() if "Using library" in ln)
    major, minor = line.split()[-1].split(".")[:2]
    return int(major), int(minor)


def migsec_migrate(dep, src: str, dst: str, name: str):
    d = dep[src]
    return d.migsec("migrate", name, f"migsec://{dep[dst].address}:7443", "--json", "--user", "admin",
                    "--password-stdin", "--config", str(d.config),
                    input="correct horse battery staple\n", timeout=300)


def virsh_start(lab: Lab, host: str, name: str):
    import subprocess

    return subprocess.run(["virsh", "-c", lab.host(host).libvirt_uri, "start", name], capture_output=True,
                          text=True, timeout=120, check=False)


def native_migrate(lab: Lab, name: str):
    import subprocess

    a, b = lab.host("a"), lab.host("b")
    # --unsafe: the lab's image dirs are not bind-mounted, so b sees a's disk at the same
    # path (shared storage in effect) but libvirt cannot tell that from the cache mode
    return subprocess.run(["virsh", "-c", a.libvirt_uri, "migrate", "--live", "--unsafe", name,
                           b.libvirt_uri, f"tcp://{b.address}"], capture_output=True, text=True, timeout=180,
                          check=False)


def set_allow(dep, allow: bool) -> None:
    cfg = dep["b"].config
    text = cfg.read_text().split("\n[hooks]\n")[0]
    cfg.write_text(text + f"\n[hooks]\nallow_native_migration = {'true' if allow else 'false'}\n")


def test_native_migration_into_b_is_refused_and_audited(env):
    lab, dep = env
    name = "n" + secrets.token_hex(2)
    boot(lab, name)
    r = native_migrate(lab, name)
    assert r.returncode != 0
    assert f"incoming libvirt migration of domain '{name}' refused" in r.stderr, r.stderr
    assert state(lab, "a", name) == "running" and state(lab, "b", name) == "absent"
    refused = [e for e in ledger_b(dep).entries() if e.kind == "native-migration-refused"]
    assert refused and refused[-1].body["domain"] == name and refused[-1].body["uuid"]
    v = dep["b"].migsec("audit", "--config", str(dep["b"].config), "verify")
    assert v.returncode == 0, v.stderr

    # the same command with the door opened: it is the hook that refused, not the lab
    set_allow(dep, True)
    try:
        r = native_migrate(lab, name)
    finally:
        set_allow(dep, False)
    assert r.returncode == 0, r.stderr
    assert state(lab, "b", name) == "running"
    kinds = [(e.kind, e.body.get("domain")) for e in ledger_b(dep).entries()]
    assert ("native-migration-allowed", name) in kinds and ("vm-started", name) in kinds
    # the source's side: libvirt >= 10.5 passes the stop reason ("migrated"); 9.0 passes
    # none, so there the migration out is a stop like any other (the documented limit)
    at_a = [e for e in ledger_of(dep, "a").entries() if e.body.get("domain") == name]
    if libvirt_version(lab) >= (10, 5):
        assert "native-migration-out" in [e.kind for e in at_a]
    else:
        stops = [e for e in at_a if e.kind == "vm-stopped"]
        assert stops and "reason" not in stops[-1].body, [(e.kind, dict(e.body)) for e in at_a]
    lab.host("b").virsh("destroy", name, check=False)


def test_migsec_migrate_into_b_works_with_the_hook(env):
    lab, dep = env
    name = "m" + secrets.token_hex(2)
    boot(lab, name)
    before = wait_counter(lab, "a", name, 2)
    a = dep["a"]
    proc = a.migsec("migrate", name, f"migsec://{dep['b'].address}:7443", "--json", "--user", "admin",
                    "--password-stdin", "--config", str(a.config),
                    input="correct horse battery staple\n", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)
    assert state(lab, "b", name) == "running" and state(lab, "a", name) != "running"
    wait_counter(lab, "b", name, before)
    kinds = [(e.kind, e.body.get("domain")) for e in ledger_b(dep).entries()]
    assert ("vm-started", name) in kinds  # the hook's record, in migsecd's ledger
    v = dep["b"].migsec("audit", "--config", str(dep["b"].config), "verify")
    assert v.returncode == 0, v.stderr
    lab.host("b").virsh("destroy", name, check=False)


def test_virsh_restore_on_b_maps_a_foreign_save_image(env):
    lab, dep = env
    a, b = lab.host("a"), lab.host("b")
    name = "r" + secrets.token_hex(2)
    boot(lab, name)
    before = wait_counter(lab, "a", name, 2)
    save = a.image_dir / f"{name}.save"
    a.virsh("save", name, str(save), timeout=120)
    # the operator moves the files to b; their old paths are gone
    for f in (save, a.image_dir / f"{name}.qcow2"):
        shutil.move(f, b.image_dir / f.name)
    b.virsh("restore", str(b.image_dir / save.name), timeout=120)
    xml = b.virsh("dumpxml", name)
    assert f"file='{b.image_dir / (name + '.qcow2')}'" in xml, xml
    assert state(lab, "b", name) == "running"
    wait_counter(lab, "b", name, before)
    # a save image from another host restored outside migsec has its own audit kind
    foreign = [e for e in ledger_b(dep).entries() if e.kind == "foreign-restore"]
    assert foreign and foreign[-1].body["domain"] == name and foreign[-1].body["uuid"]
    b.virsh("destroy", name, check=False)


def test_a_moved_guest_cannot_run_twice_until_released(env):
    lab, dep = env
    name = "t" + secrets.token_hex(2)
    boot(lab, name)
    before = wait_counter(lab, "a", name, 2)
    proc = migsec_migrate(dep, "a", "b", name)  # no --undefinesource: a keeps the definition
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mid = json.loads(proc.stdout)["migration_id"]
    wait_counter(lab, "b", name, before)
    assert state(lab, "a", name) == "shut off"
    # starting the kept definition would run the guest twice: the hook refuses it
    r = virsh_start(lab, "a", name)
    assert r.returncode != 0, r.stdout
    assert f"migsec migrated it to {dep['b'].did} (migration {mid}" in r.stderr, r.stderr
    assert f"`migsec release {name}`" in r.stderr, r.stderr
    assert state(lab, "a", name) == "shut off" and state(lab, "b", name) == "running"
    kinds = [(e.kind, e.body.get("domain")) for e in ledger_of(dep, "a").entries()]
    assert ("given-away", name) in kinds and ("start-refused-moved", name) in kinds
    # the operator stops it at b and releases it at a: it starts there again
    lab.host("b").virsh("destroy", name)
    a = dep["a"]
    rel = a.migsec("release", name, "--config", str(a.config))
    assert rel.returncode == 0, rel.stdout + rel.stderr
    assert f"released {name}" in rel.stdout
    released = [e for e in ledger_of(dep, "a").entries() if e.kind == "vm-release"]
    assert released and released[-1].body["domain"] == name and released[-1].migration_id == mid
    r = virsh_start(lab, "a", name)
    assert r.returncode == 0, r.stderr
    assert state(lab, "a", name) == "running"
    again = a.migsec("release", name, "--config", str(a.config))
    assert again.returncode != 0 and "no migsec 'given away' mark" in again.stderr
    for host in ("a", "b"):
        v = dep[host].migsec("audit", "--config", str(dep[host].config), "verify")
        assert v.returncode == 0, v.stdout + v.stderr
    lab.host("a").virsh("destroy", name, check=False)


def test_a_guest_migrated_back_starts_again_where_it_was_kept(env):
    lab, dep = env
    name = "k" + secrets.token_hex(2)
    boot(lab, name)
    before = wait_counter(lab, "a", name, 2)
    proc = migsec_migrate(dep, "a", "b", name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = wait_counter(lab, "b", name, before)
    assert "https://migsec.example/xmlns/1/moved" in lab.host("a").virsh("dumpxml", "--inactive", name)
    # a returning migration never overwrites a file: the stale disk a kept goes first
    (lab.host("a").image_dir / f"{name}.qcow2").unlink()
    proc = migsec_migrate(dep, "b", "a", name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_counter(lab, "a", name, before)
    assert state(lab, "a", name) == "running" and state(lab, "b", name) != "running"
    assert "https://migsec.example/xmlns/1/moved" not in lab.host("a").virsh("dumpxml", "--inactive", name)
    kinds = [(e.kind, e.body.get("domain")) for e in ledger_of(dep, "a").entries()]
    assert ("vm-returned", name) in kinds
    # the kept definition is an ordinary one again: it stops and starts
    lab.host("a").virsh("destroy", name)
    r = virsh_start(lab, "a", name)
    assert r.returncode == 0, r.stderr
    lab.host("a").virsh("destroy", name, check=False)


def test_doctor_inside_lab_host_b(env):
    lab, dep = env
    b = dep["b"]
    unit = b.base / "migsecd.service"  # no systemd in the lab: point at a file that is absent
    r = b.migsec("doctor", "--config", str(b.config), "--unit", str(unit))
    lines = dict(line.split(":", 1)[0].split(None, 1)[::-1] for line in r.stdout.splitlines())
    # inside b: its own libvirtd (via /run), its hook dir (/etc/libvirt), its libvirtd.pid
    assert lines["libvirt"] == "OK" and lines["libvirt hook"] == "OK", r.stdout
    assert lines["migsecd"] == "OK" and lines["peer cloud-a.example"] == "OK", r.stdout
    assert lines["systemd unit"] == "WARN"
    assert r.returncode == 0, r.stdout + r.stderr


def test_migsec_live_migration_into_b_passes_the_hook_by_its_permit(env):
    """libvirt's own incoming migration, but migsec's: B's migsecd wrote a one-time permit for it."""
    lab, dep = env
    name = "l" + secrets.token_hex(2)
    boot(lab, name)
    before = wait_counter(lab, "a", name, 2)
    a = dep["a"]
    proc = a.migsec("migrate", name, f"migsec://{dep['b'].address}:7443", "--live", "--json", "--user", "admin",
                    "--password-stdin", "--config", str(a.config),
                    input="correct horse battery staple\n", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mid = json.loads(proc.stdout)["migration_id"]
    assert state(lab, "b", name) == "running" and state(lab, "a", name) != "running"
    wait_counter(lab, "b", name, before)
    admitted = [e for e in ledger_b(dep).entries() if e.kind == "live-migration-admitted"]
    assert [e.body.get("migration_id") for e in admitted if e.body.get("domain") == name] == [mid]
    assert not list((dep["b"].base / "state" / "permits").glob("*.json"))  # consumed
    v = dep["b"].migsec("audit", "--config", str(dep["b"].config), "verify")
    assert v.returncode == 0, v.stderr
    lab.host("b").virsh("destroy", name, check=False)

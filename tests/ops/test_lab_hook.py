"""The hook in a real libvirtd: host b of the lab gets hooks/qemu before its libvirtd starts.

- libvirt's own migration a -> b (``virsh migrate``, client-driven: virsh talks to both
  libvirtds over their unix sockets, QEMU streams over the lab network) is refused by the
  hook in b's prepare phase, audited in b's ledger; with ``allow_native_migration`` the same
  command goes through, so the refusal is the hook's doing;
- ``migsec migrate`` a -> b works with the hook in place (it restores through libvirt, the
  hook sees migsecd's already-mapped XML and lifecycle events land in the same ledger);
- ``virsh restore`` on b of a save image made on a (files moved to b's image directory) is
  mapped by the hook: libvirt restores the guest on b's paths and its counter goes on.
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
        # b's /etc/libvirt is <lab>/b/etc: install there before b's libvirtd starts
        layout = Layout(prefix=Path(sys.prefix), config_dir=lab.dir / "b" / "migsec",
                        hooks_dir=lab.dir / "b" / "etc" / "hooks")
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
    b.virsh("destroy", name, check=False)


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

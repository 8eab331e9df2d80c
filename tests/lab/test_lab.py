"""The lab on real libvirtds: hosts, TCP between them, and a guest saved on A and restored on B."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migsec import virt
from migsec.errors import DomainNotFoundError, LabError, MappingError, SaveImageError
from migsec.lab import guest as g
from migsec.lab.ns import all_pids, ns_inode, proc_namespaces

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]


def wait_for(check, timeout, what):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
    return result


def domains(host) -> dict[str, str]:
    with virt.connect(host.libvirt_uri) as conn:
        return {n: virt.domain_state(conn, n).value for n in conn.list_domains()}


def test_hosts_have_their_own_addresses_and_libvirt(lab):
    a, b = lab.host("a"), lab.host("b")
    assert a.image_dir != b.image_dir
    for h in (a, b):
        addrs = h.exec(["ip", "-o", "-4", "addr", "show"]).stdout
        assert f"{h.address}/15" in addrs
        other = b if h is a else a
        assert f"{other.address}/15" not in addrs
        # Inside the host, /etc/libvirt and /run are the host's own directories.
        assert h.exec(["cat", "/etc/libvirt/qemu.conf"]).stdout == (h.dir / "etc/qemu.conf").read_text()
        assert h.exec(["test", "-S", "/run/libvirt/libvirt-sock"], check=False).returncode == 0
    assert "vm1" in domains(a) and "vm1" not in domains(b)


def test_tcp_from_a_reaches_a_listener_in_b(lab):
    a, b = lab.host("a"), lab.host("b")
    server = b.popen([sys.executable, "-c", (
        "import socket,sys;s=socket.create_server(('198.18.0.2',7443));print('ready',flush=True);"
        "c,peer=s.accept();c.sendall(('hello '+peer[0]).encode());c.close()")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        got = a.exec([sys.executable, "-c", (
            "import socket;c=socket.create_connection(('198.18.0.2',7443),timeout=5);"
            "print(c.recv(100).decode())")]).stdout.strip()
        assert got == f"hello {a.address}"
        # The lab's addresses live only inside its hosts, not in the machine's namespace.
        outside = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
        assert a.address not in outside and b.address not in outside
    finally:
        server.kill()
        server.wait()


def test_up_again_changes_nothing(lab):
    before = lab._state["pids"]
    boots = g.parse_console(lab.host("a").console_log("vm1")).boots
    lab.up(2, guest="vm1")
    assert lab._state["pids"] == before
    assert g.parse_console(lab.host("a").console_log("vm1")).boots == boots  # no reboot
    with pytest.raises(LabError, match="run `migsec lab down` first"):
        lab.up(3)


def cli(lab, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "migsec.cli", "lab", "--dir", str(lab.dir), *args],
                          capture_output=True, text=True, timeout=60)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def test_cli_status_exec_and_console_log(lab):
    import json
    st = json.loads(cli(lab, "status", "--json").stdout)
    assert st["prefix"] == lab.prefix and st["hosts"]["b"]["uri"] == lab.host("b").libvirt_uri
    assert st["hosts"]["a"]["domains"]["vm1"] in ("running", "shut off")
    assert "198.18.0.2/15" in cli(lab, "exec", "b", "--", "ip", "-o", "addr").stdout
    assert cli(lab, "exec", "a", "--", "sh", "-c", "exit 3", check=False).returncode == 3
    assert "MIGSEC-BOOT" in cli(lab, "console", "a", "vm1", "--log").stdout
    bad = cli(lab, "exec", "q", "--", "true", check=False)
    assert bad.returncode == 1 and "no lab host 'q'" in bad.stderr


def test_unknown_host_is_named(lab):
    with pytest.raises(LabError, match="no lab host 'q'"):
        lab.host("q")


# --- save on A, restore on B -----------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(lab):
    """vm1 saved on A (after it wrote some disk blocks) and its files copied to B."""
    a, b = lab.host("a"), lab.host("b")
    log_a = a.console_log("vm1")
    wait_for(lambda: len(g.parse_console(log_a).disk_writes) >= 3, 60, "vm1 to write disk blocks")
    conn_a = virt.connect(a.libvirt_uri)
    info = virt.describe_domain(conn_a, "vm1")
    save_a = a.image_dir / "vm1.save"
    t0 = time.monotonic()
    virt.suspend_domain(conn_a, "vm1")
    virt.save_domain(conn_a, "vm1", str(save_a))
    save_seconds = time.monotonic() - t0
    # virtlogd writes the console log asynchronously: read it once it stopped growing.
    sizes = []
    wait_for(lambda: sizes.append(log_a.stat().st_size) or sizes[-3:] == [sizes[-1]] * 3, 10,
             "A's console log to settle")
    console_a = g.parse_console(log_a)
    for f in (save_a, a.image_dir / "vm1.qcow2"):
        subprocess.run(["cp", "--sparse=always", str(f), str(b.image_dir / f.name)], check=True)
    yield {"info": info, "save_a": save_a, "save_b": b.image_dir / "vm1.save", "console_a": console_a,
           "conn_a": conn_a, "save_seconds": save_seconds, "a": a, "b": b}
    conn_a.close()


def test_save_of_a_missing_domain_is_refused(lab):
    a = lab.host("a")
    path = a.image_dir / "nope.save"
    before = domains(a)
    with virt.connect(a.libvirt_uri) as conn, pytest.raises(DomainNotFoundError, match="nope"):
        virt.save_domain(conn, "nope", str(path))
    assert not path.exists()
    assert domains(a) == before


def test_save_image_of_another_guest_is_refused(lab, saved):
    b = saved["b"]
    other = lab.define_guest("a", "vm2", memory="128M", disk_size="64M", region_mib=8)
    with virt.connect(lab.host("a").libvirt_uri) as conn_a:
        other_uuid = virt.describe_domain(conn_a, "vm2").uuid
        other_xml = virt.domain_xml(conn_a, "vm2", inactive=True)
    before = domains(b)
    with virt.connect(b.libvirt_uri) as conn_b:
        with pytest.raises(SaveImageError, match="belongs to domain 'vm1'"):
            virt.save_image_restore_xml(conn_b, str(saved["save_b"]), uuid=other_uuid,
                                        disk_map={str(lab.host("a").image_dir): str(b.image_dir)})
        # Even handed straight to libvirt with the other guest's XML, the image is refused.
        wrong = virt.rewrite_domain_xml(other_xml, disk_map={str(lab.host("a").image_dir): str(b.image_dir)})
        with pytest.raises(virt.DomainXmlError, match="uuid .* does not match"):
            virt.restore_domain(conn_b, str(saved["save_b"]), xml=wrong, paused=True)
    assert domains(b) == before
    assert other.disk.exists()


def test_disk_path_without_mapping_is_refused(saved):
    b = saved["b"]
    before = domains(b)
    with virt.connect(b.libvirt_uri) as conn_b:
        with pytest.raises(MappingError, match="vda"):
            virt.save_image_restore_xml(conn_b, str(saved["save_b"]), uuid=saved["info"].uuid,
                                        disk_map={"/srv/elsewhere": str(b.image_dir)})
    assert domains(b) == before


def test_restored_on_b_the_guest_continues(lab, saved):
    a, b = saved["a"], saved["b"]
    before = saved["console_a"]
    boot = before.boots[-1]
    with virt.connect(b.libvirt_uri) as conn_b:
        xml = virt.save_image_restore_xml(conn_b, str(saved["save_b"]), uuid=saved["info"].uuid,
                                          disk_map={str(a.image_dir): str(b.image_dir)})
        assert str(a.image_dir) not in xml
        t0 = time.monotonic()
        virt.restore_domain(conn_b, str(saved["save_b"]), xml=xml, paused=False)
        restore_seconds = time.monotonic() - t0
        assert virt.domain_state(conn_b, "vm1") == virt.DomainState.RUNNING
        disk_b = virt.describe_domain(conn_b, "vm1").disks[0].source
    assert disk_b == str(b.image_dir / "vm1.qcow2")
    # Host A no longer runs it.
    assert virt.domain_state(saved["conn_a"], "vm1") != virt.DomainState.RUNNING
    assert not any(p.name == "vm1.pid" for p in (a.dir / "run/libvirt/qemu").iterdir())

    log_b = b.console_log("vm1")
    wait_for(lambda: len(g.parse_console(log_b).counters) >= 5, 30, "the counter on B")
    # The counter continues where it stopped on A: no restart, no gap beyond the cut line.
    after = g.parse_console(log_b)
    last_a = before.counters[-1]
    assert last_a + 1 <= after.counters[0] <= last_a + 2, (last_a, after.counters[:3])
    assert after.counters == list(range(after.counters[0], after.counters[0] + len(after.counters)))
    assert after.boots == []
    # The memory region is the one filled at boot on A, checked again on B.
    wait_for(lambda: g.parse_console(log_b).memory, 30, "a memory check on B")
    expected = g.expected_memory_sha256("vm1", 64)
    assert [m.sha256 for m in before.memory if m.seq == 0] == [expected]
    mem_b = g.parse_console(log_b).memory
    assert all(m.boot == boot and m.ok and m.sha256 == expected for m in mem_b), mem_b
    # The disk blocks written on A are on B's copy: the guest reads them back from disk.
    lab.request_disk_check("b", "vm1")
    check = wait_for(lambda: g.parse_console(log_b).disk_checks, 60, "the disk check on B")[0]
    assert check.boot == boot and check.bad == 0
    assert check.blocks >= len(before.disk_writes)
    # Bringing the lab "up" again does not boot a second copy on A.
    lab.up(2, guest="vm1")
    assert virt.domain_state(saved["conn_a"], "vm1") != virt.DomainState.RUNNING
    # And from outside once it stops: every block either side reported verifies.
    with virt.connect(b.libvirt_uri) as conn_b:
        virt.destroy_domain(conn_b, "vm1")
    report = g.verify_disk(b.image_dir / "vm1.qcow2")
    assert report.bad == []
    written = dict(before.disk_writes + g.parse_console(log_b).disk_writes)
    assert written and all(report.blocks.get(k) == sha for k, sha in written.items())
    print(f"\nvm1 (256 MiB): save {saved['save_seconds']:.2f} s, image "
          f"{saved['save_a'].stat().st_size / 1e6:.1f} MB, restore {restore_seconds:.2f} s")


# --- down ---------------------------------------------------------------------------------------
def _leftovers(lab, netns_inodes):
    procs = [p for p in all_pids() if proc_namespaces(p) & netns_inodes]
    netns = [n for n in os.listdir("/run/netns") if n.startswith(lab.prefix + "-")] \
        if os.path.isdir("/run/netns") else []
    with open("/proc/self/mountinfo") as f:
        mounts = [line for line in f if str(lab.dir) in line]
    return procs, netns, mounts, lab.dir.exists()


def test_down_after_a_crash_leaves_nothing(new_lab):
    lab = new_lab("crash")
    try:
        lab.up(2, guest=None)
        lab.define_guest("a", "small", memory="128M", disk_size="64M", region_mib=8)
        lab.start_guest("a", "small")
        inodes = {ns_inode(Path("/run/netns", h.netns)) for h in lab.hosts()}
        inodes |= {ns_inode(h.mount_ns) for h in lab.hosts()}
        qemu = int((lab.host("a").dir / "run/libvirt/qemu/small.pid").read_text())
        assert proc_namespaces(qemu) & inodes
        # A crash: libvirtd of A killed, the state file lost.
        os.kill(lab._state["pids"]["a"]["libvirtd"][0], signal.SIGKILL)
        (lab.dir / "state.json").unlink()
        type(lab)(lab.dir, lab.prefix).down()
        assert _leftovers(lab, inodes) == ([], [], [], False)
    finally:
        if lab.dir.exists():
            lab.down()


def test_up_repairs_a_dead_daemon_and_down_leaves_nothing(new_lab):
    lab = new_lab("repair")
    try:
        lab.up(2, guest=None)
        inodes = {ns_inode(Path("/run/netns", h.netns)) for h in lab.hosts()}
        inodes |= {ns_inode(h.mount_ns) for h in lab.hosts()}
        dead = lab._state["pids"]["b"]["libvirtd"]
        os.kill(dead[0], signal.SIGKILL)
        wait_for(lambda: not lab.status()["hosts"]["b"]["daemons"]["libvirtd"], 10, "libvirtd of b to die")
        lab.up(2, guest=None)
        assert lab._state["pids"]["b"]["libvirtd"] != dead
        assert lab.status()["hosts"]["b"]["daemons"] == {"virtlogd": True, "libvirtd": True}
        assert lab.host("b").virsh("uri").strip() == lab.host("b").libvirt_uri
        lab.down()
        assert _leftovers(lab, inodes) == ([], [], [], False)
        lab.down()  # again: nothing to do, no error
    finally:
        if lab.dir.exists():
            lab.down()

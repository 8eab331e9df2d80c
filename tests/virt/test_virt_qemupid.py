"""Watching the source QEMU's exit (migsec.virt.qemupid) on real processes: a process that
names the domain's UUID on its command line stands in for QEMU, found through a pid file as
libvirt writes it."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from migsec.virt import qemupid

SYSTEM = "qemu+unix:///system?socket=/run/lab/libvirt-sock"


@pytest.fixture
def fake_qemu(tmp_path):
    uuid = str(uuidlib.uuid4())
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-name", "guest=vm1",
                             "-uuid", uuid])
    deadline = time.monotonic() + 10
    while uuid.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():  # until it has exec'd
        assert time.monotonic() < deadline, "the stand-in QEMU did not start"
        time.sleep(0.01)
    (tmp_path / "vm1.pid").write_text(f"{proc.pid}\n")
    yield proc, uuid
    proc.kill()
    proc.wait()


def test_the_exit_is_seen_the_moment_the_process_dies_before_anyone_reaps_it(fake_qemu, tmp_path):
    proc, uuid = fake_qemu
    seen = threading.Event()
    watch = qemupid.watch_exit(SYSTEM, "vm1", uuid, seen.set, run_dir=tmp_path)
    assert watch is not None and watch.pid == proc.pid
    assert not seen.wait(0.3) and not watch.exited.is_set()  # still running
    proc.send_signal(signal.SIGTERM)
    assert seen.wait(10), "the exit was not seen"
    assert watch.exited.is_set()
    assert proc.poll() is not None or proc.returncode is None  # (a zombie until reaped here)
    watch.close()
    watch.close()  # idempotent, also after the watcher ended


def test_a_process_that_does_not_name_the_uuid_is_never_taken_for_the_qemu(fake_qemu, tmp_path):
    _proc, _uuid = fake_qemu
    assert qemupid.watch_exit(SYSTEM, "vm1", str(uuidlib.uuid4()), lambda: None, run_dir=tmp_path) is None


def test_no_pid_file_or_a_stale_one_or_another_driver_means_no_watch(fake_qemu, tmp_path):
    proc, uuid = fake_qemu
    assert qemupid.watch_exit(SYSTEM, "vm2", uuid, lambda: None, run_dir=tmp_path) is None
    (tmp_path / "vm3.pid").write_text("999999999\n")
    assert qemupid.watch_exit(SYSTEM, "vm3", uuid, lambda: None, run_dir=tmp_path) is None
    (tmp_path / "vm4.pid").write_text("not a pid\n")
    assert qemupid.watch_exit(SYSTEM, "vm4", uuid, lambda: None, run_dir=tmp_path) is None
    assert qemupid.run_dir_for("qemu:///session") is None
    assert qemupid.run_dir_for("qemu+ssh://elsewhere/system") is None
    assert qemupid.run_dir_for(SYSTEM) == qemupid.SYSTEM_RUN_DIR
    assert qemupid.watch_exit("test:///default", "vm1", uuid, lambda: None) is None


def test_closing_the_watch_stops_it_without_an_exit(fake_qemu, tmp_path):
    proc, uuid = fake_qemu
    seen = threading.Event()
    watch = qemupid.watch_exit(SYSTEM, "vm1", uuid, seen.set, run_dir=tmp_path)
    assert watch is not None
    watch.close()
    proc.kill()
    proc.wait()
    assert not seen.wait(0.3) and not watch.exited.is_set()

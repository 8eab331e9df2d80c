"""Lab bookkeeping that needs no root: names, state, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from migsec.errors import LabError
from migsec.lab import Lab


@pytest.mark.parametrize("prefix", ["UPPER", "1abc", "has-dash", "waytoolongprefix"])
def test_bad_prefix_is_refused(tmp_path, prefix):
    with pytest.raises(LabError, match="prefix"):
        Lab(tmp_path / "lab", prefix)


def test_down_refuses_a_dir_that_is_not_a_lab(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    with pytest.raises(LabError, match="not a migsec lab dir"):
        Lab(tmp_path, "tzz").down()
    assert precious.read_text() == "keep me"


def test_prefix_comes_from_the_state_and_must_match(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"prefix": "dev1", "hosts": ["a", "b"]}))
    lab = Lab.load(tmp_path)
    assert lab.prefix == "dev1" and lab.host("b").netns == "dev1-b"
    assert lab.host("b").libvirt_uri == f"qemu+unix:///system?socket={tmp_path}/b/run/libvirt/libvirt-sock"
    with pytest.raises(LabError, match="prefix 'dev1', not 'dev2'"):
        Lab(tmp_path, "dev2")


def test_load_without_a_lab_and_unreadable_state(tmp_path):
    with pytest.raises(LabError, match="no lab in"):
        Lab.load(tmp_path)
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(LabError, match="unreadable"):
        Lab(tmp_path)


def test_paths_inside_a_host_map_to_its_directory(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"prefix": "dev1", "hosts": ["a", "b"]}))
    b = Lab(tmp_path).host("b")
    assert b.console_log("vm1") == tmp_path / "b/log/qemu/vm1-console.log"
    assert b.outside("/run/libvirt/qemu/vm1.pid") == tmp_path / "b/run/libvirt/qemu/vm1.pid"
    assert b.outside("/etc/libvirt") == tmp_path / "b/etc"
    assert b.outside(str(b.image_dir / "d.qcow2")) == b.image_dir / "d.qcow2"
    assert b.nsenter("/x")[:4] == ["nsenter", "--net=/run/netns/dev1-b", f"--mount={tmp_path}/ns/b.mnt", "--wd=/x"]
    assert b.outside("/etc/libvirtx/y") == Path("/etc/libvirtx/y")  # not under a bind mount


def test_unavailable_reason_names_what_is_missing(monkeypatch):
    import migsec.lab.lab as labmod

    monkeypatch.setattr(labmod.os, "geteuid", lambda: 1000)
    assert "needs root" in labmod.unavailable_reason()
    monkeypatch.setattr(labmod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(labmod.shutil, "which", lambda tool: None if tool == "virtlogd" else "/bin/" + tool)
    assert labmod.unavailable_reason() == "missing tools for the lab: virtlogd (run scripts/setup.sh)"
    monkeypatch.setattr(labmod.shutil, "which", lambda tool: "/bin/" + tool)
    monkeypatch.setattr(labmod.guestmod, "kernel_versions", lambda: [])
    assert "cloud-amd64 kernel" in labmod.unavailable_reason()

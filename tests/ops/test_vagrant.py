"""vagrant/: `vagrant validate` with the vagrant-libvirt provider (offline; `vagrant up` cannot
run on the build machines) and shell syntax of the provisioning scripts."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO

VAGRANT_DIR = REPO / "vagrant"
needs_vagrant = pytest.mark.skipif(
    shutil.which("vagrant") is None,
    reason="vagrant is not installed (apt packages vagrant and vagrant-libvirt; scripts/setup.sh)")


def validate(directory: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_DEFAULT_PROVIDER="libvirt")
    return subprocess.run(["vagrant", "validate"], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.fixture
def copy(tmp_path) -> Path:
    # validate writes .vagrant/ beside the Vagrantfile: work on a copy, keep the checkout clean
    dest = tmp_path / "vagrant"
    shutil.copytree(VAGRANT_DIR, dest, ignore=shutil.ignore_patterns(".vagrant", ".bootstrap"))
    return dest


@needs_vagrant
def test_vagrantfile_validates_with_the_libvirt_provider(copy):
    r = validate(copy)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Vagrantfile validated successfully." in r.stdout
    assert not (copy / ".bootstrap").exists()  # the key is made by `vagrant up`, not validate


@needs_vagrant
def test_validate_catches_provider_and_provisioner_mistakes(copy):
    text = (copy / "Vagrantfile").read_text()
    (copy / "Vagrantfile").write_text(text.replace("lv.nested = true", "lv.nestedd = true"))
    r = validate(copy)
    assert r.returncode != 0 and "nestedd" in r.stdout + r.stderr
    (copy / "Vagrantfile").write_text(text)
    (copy / "provision" / "domain.sh").unlink()
    r = validate(copy)
    assert r.returncode != 0 and "domain.sh" in r.stdout + r.stderr


def test_vagrantfile_keeps_the_lab_requirements():
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert "lv.nested = true" in text and "provider :libvirt" in text
    ips = [line.split('ip: "')[1].split('"')[0] for line in text.splitlines() if 'ip: "' in line]
    assert len(ips) == 2 and not any(ip.endswith(".1") for ip in ips)  # .1 is the network's own


@pytest.mark.parametrize("script", sorted(p.name for p in (VAGRANT_DIR / "provision").glob("*.sh")))
def test_provisioning_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(VAGRANT_DIR / "provision" / script)], capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr

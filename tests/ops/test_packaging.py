"""A plain ``pip install`` of the wheel carries the host files: ``migsec install`` needs no checkout.

The wheel is built from this checkout and installed into a fresh venv without its
dependencies (they come from this test's own environment through a ``.pth`` line, so
nothing is downloaded); ``migsec install`` then runs from a directory outside the checkout.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOST_FILES = ("migsec/data/migsecd.service", "migsec/data/migsec.conf", "migsec/data/qemu-hook",
              "migsec/data/migsecd.toml", "migsec/data/operators.md", "migsec/data/migsec.1")


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
              "-w", str(out), str(REPO)])
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("migsec-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_carries_the_host_files_and_a_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in HOST_FILES:
        assert name in names, f"{name} missing from {wheel.name}"
    assert any(n.endswith(".dist-info/LICENSE") or "/licenses/LICENSE" in n for n in names), sorted(names)


@pytest.mark.slow
def test_sdist_carries_the_host_files_and_a_license(tmp_path):
    r = _run([sys.executable, "-m", "build", "--version"])
    if r.returncode != 0:
        # no `build` frontend: setuptools' own sdist command, from a copy (it writes egg-info)
        r = _run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "sdist",
                  "--dist-dir", str(tmp_path)], cwd=REPO)
    else:
        r = _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), str(REPO)])
    assert r.returncode == 0, r.stderr
    (sdist,) = tmp_path.glob("migsec-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for name in ("LICENSE", "CHANGELOG.md", "hooks/qemu", "systemd/migsecd.service", "systemd/migsec.conf",
                 "examples/migsecd.toml", "docs/operators.md", "docs/migsec.1"):
        assert name in names, f"{name} missing from {sdist.name}"


@pytest.mark.slow
def test_migsec_install_works_from_a_plain_wheel_install(wheel, tmp_path):
    venv = tmp_path / "venv"
    r = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the dependencies from this environment, after the venv's own site-packages
    (site / "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MIGSEC_CONFIG")}
    # --ignore-installed: the migsec this test runs from is visible through the .pth line, and
    # pip must install the wheel into the venv anyway
    r = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
              "--ignore-installed", "-q", str(wheel)], env=env)
    if r.returncode != 0 and "no such option: --python" in r.stderr:
        pytest.skip("pip too old for --python")
    assert r.returncode == 0, r.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = _run([str(venv / "bin" / "python"), "-c", "import migsec; print(migsec.__file__)"], cwd=outside, env=env)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # not this checkout
    root = tmp_path / "root"
    r = _run([str(venv / "bin" / "migsec"), "install", "--root", str(root), "--prefix", str(venv)],
             cwd=outside, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    unit = (root / "etc/systemd/system/migsecd.service").read_text()
    assert f"ExecStart={venv}/bin/migsecd --config /etc/migsec/migsecd.toml" in unit
    hook = (root / "etc/libvirt/hooks/qemu.d/50-migsec").read_text()
    assert hook.startswith(f"#!{venv}/bin/python")
    assert "migsec.hooks.qemu" in hook
    config = root / "etc/migsec/migsecd.toml"
    assert "[domain]" in config.read_text()
    assert (root / "etc/tmpfiles.d/migsec.conf").is_file()
    assert (root / "usr/share/doc/migsec/operators.md").is_file()
    assert (root / "usr/share/man/man1/migsec.1").read_text().startswith(".TH MIGSEC 1")
    # the sample config is the one migsecd reads: it parses with the installed package
    r = _run([str(py), "-c", "import sys; from migsec.config import load_config; "
              "load_config(sys.argv[1], check_files=False)", str(config)], cwd=outside, env=env)
    assert r.returncode == 0, r.stderr

"""The systemd unit and tmpfiles entry, checked by systemd's own tools on installed copies."""
from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from migsec.ops.layout import Layout, apply, plan

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze missing (apt package systemd; scripts/setup.sh)")


@pytest.fixture
def installed(tmp_path) -> Layout:
    # the venv's prefix: ExecStart then names a migsecd that exists, as verify requires
    layout = Layout(prefix=Path(sys.prefix), root=tmp_path / "root")
    apply(plan(layout))
    return layout


def verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          timeout=120, check=False, cwd=unit.parent)


def test_installed_unit_passes_systemd_analyze_verify(installed):
    unit = installed.under_root(installed.unit)
    r = verify(unit)
    # verify exits 0 on some problems (an unknown Type= is only "ignoring"): demand silence too
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert f"ExecStart={sys.prefix}/bin/migsecd --config /etc/migsec/migsecd.toml" in unit.read_text()


def test_verify_catches_a_broken_unit(installed, tmp_path):
    good = installed.under_root(installed.unit).read_text()
    broken = tmp_path / "broken" / "migsecd.service"
    broken.parent.mkdir()
    for bad in (good.replace("Type=notify", "Type=notfy"),
                good.replace(f"{sys.prefix}/bin/migsecd", "/nonexistent/migsecd")):
        broken.write_text(bad)
        r = verify(broken)
        assert r.returncode != 0 or r.stderr, bad


def test_unit_is_hardened_by_systemds_own_measure(installed):
    # systemd-analyze security: 0 (locked down) .. 100 (exposed); a root service reading
    # VM images cannot reach 0, but it must stay in systemd's "OK" band
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=30",
                        str(installed.under_root(installed.unit))],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr


def test_unit_directives_an_operator_relies_on(installed):
    text = installed.under_root(installed.unit).read_text()
    settings = [line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")]
    got = {}
    for key, value in settings:
        got.setdefault(key, []).append(value)
    assert got["Type"] == ["notify"] and got["NotifyAccess"] == ["main"]
    assert got["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "libvirtd.service" in got["After"][0] and "libvirtd.service" in got["Wants"][0]
    assert got["ProtectSystem"] == ["strict"] and got["NoNewPrivileges"] == ["yes"]
    assert got["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    writable = " ".join(got["ReadWritePaths"]).split()
    assert {"/var/lib/migsec", "/run/migsec", "/etc/migsec", "-/var/lib/libvirt/images"} <= set(writable)


def test_tmpfiles_entry_creates_private_state_dirs(installed, tmp_path):
    target = tmp_path / "fresh"
    conf = installed.under_root(installed.tmpfiles_dir / "migsec.conf")
    r = subprocess.run(["systemd-tmpfiles", f"--root={target}", "--create", str(conf)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    for sub, mode in (("var/lib/migsec", 0o700), ("var/lib/migsec/journal", 0o700),
                      ("var/lib/migsec/staging", 0o700), ("run/migsec", 0o750),
                      ("etc/migsec/pki", 0o700)):
        assert stat.S_IMODE((target / sub).stat().st_mode) == mode, sub

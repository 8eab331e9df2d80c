"""`migsec install` into a DESTDIR: what it writes, idempotence, the operator's config kept."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from migsec.cli import main
from migsec.config import load_config
from migsec.errors import ConfigError
from migsec.ops.layout import Layout, apply, plan

from .conftest import mode


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_install_puts_everything_in_place_with_the_right_modes(tmp_path):
    root = tmp_path / "root"
    r = cli("install", "--root", str(root))
    assert r.exit_code == 0, r.output
    n = len(plan(Layout(prefix=Path(sys.prefix), root=root)))
    assert f"{n} changed, 0 already in place" in r.output
    expect = {
        "etc/migsec": 0o755, "etc/migsec/pki": 0o700, "etc/migsec/policies": 0o755,
        "var/lib/migsec": 0o700, "var/lib/migsec/journal": 0o700, "var/lib/migsec/staging": 0o700,
        "run/migsec": 0o750, "etc/migsec/migsecd.toml": 0o640,
        "etc/systemd/system/migsecd.service": 0o644, "etc/tmpfiles.d/migsec.conf": 0o644,
        "etc/libvirt/hooks/qemu.d/50-migsec": 0o755, "usr/share/doc/migsec/operators.md": 0o644,
    }
    for rel, want in expect.items():
        assert mode(root / rel) == want, rel
    # the sample configuration parses; the hook runs with this Python
    load_config(root / "etc/migsec/migsecd.toml", check_files=False)
    assert (root / "etc/libvirt/hooks/qemu.d/50-migsec").read_text().startswith(f"#!{sys.executable}\n")


def test_second_install_changes_nothing_and_says_so(tmp_path):
    root = tmp_path / "root"
    cli("install", "--root", str(root))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}
    r = cli("install", "--root", str(root))
    assert r.exit_code == 0
    n = len(plan(Layout(prefix=Path(sys.prefix), root=root)))
    assert f"nothing to change: all {n} items already in place" in r.output
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}
    assert after == before


def test_dry_run_changes_nothing(tmp_path):
    root = tmp_path / "root"
    r = cli("install", "--root", str(root), "--dry-run")
    assert r.exit_code == 0 and "would create /etc/libvirt/hooks/qemu.d/50-migsec" in r.output
    assert not root.exists()


def test_repairs_a_damaged_install_but_never_the_config(tmp_path):
    root = tmp_path / "root"
    cli("install", "--root", str(root))
    hook = root / "etc/libvirt/hooks/qemu.d/50-migsec"
    hook.chmod(0o644)
    unit = root / "etc/systemd/system/migsecd.service"
    unit.write_text("[Service]\nExecStart=/bin/false\n")
    config = root / "etc/migsec/migsecd.toml"
    config.write_text(config.read_text().replace('id = "cloud-a.example"', 'id = "mine.example"'))
    r = cli("install", "--root", str(root))
    assert f"fix mode of /etc/libvirt/hooks/qemu.d/50-migsec" in r.output
    assert "update /etc/systemd/system/migsecd.service" in r.output
    assert "kept /etc/migsec/migsecd.toml" in r.output
    assert mode(hook) == 0o755 and "Type=notify" in unit.read_text()
    assert 'id = "mine.example"' in config.read_text()


def test_unit_follows_the_configured_state_and_image_dirs(tmp_path):
    root = tmp_path / "root"
    cfg = root / "etc/migsec/migsecd.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('[domain]\nid = "cloud-b.example"\nkey = "k"\ncertificate = "c"\ntrust = ["t"]\n'
                   '[paths]\nstate_dir = "/srv/migsec"\n'
                   '[storage]\nimage_dir = "/srv/images"\nmap = { "/var/lib/libvirt/images" = "/srv/vm" }\n')
    assert cli("install", "--root", str(root)).exit_code == 0
    unit = (root / "etc/systemd/system/migsecd.service").read_text()
    assert "ReadWritePaths=/srv/migsec /run/migsec /etc/migsec" in unit
    assert "ReadWritePaths=-/srv/images\nReadWritePaths=-/srv/vm\n" in unit
    assert (root / "srv/migsec/journal").is_dir()
    assert "d      /srv/migsec/staging" in (root / "etc/tmpfiles.d/migsec.conf").read_text()


def test_other_config_dir_reaches_unit_hook_and_sample(tmp_path):
    root = tmp_path / "root"
    r = cli("install", "--root", str(root), "--config-dir", "/etc/migsec-lab")
    assert r.exit_code == 0, r.output
    unit = (root / "etc/systemd/system/migsecd.service").read_text()
    assert "--config /etc/migsec-lab/migsecd.toml" in unit
    hook = (root / "etc/libvirt/hooks/qemu.d/50-migsec").read_text()
    assert "CONFIG = '/etc/migsec-lab/migsecd.toml'" in hook
    sample = (root / "etc/migsec-lab/migsecd.toml").read_text()
    assert "/etc/migsec-lab/pki/domain-key.pem" in sample and "/etc/migsec/" not in sample


def test_installed_hook_runs_and_reads_its_configured_path(tmp_path):
    from .conftest import make_site

    site = make_site(tmp_path / "site")
    root = tmp_path / "root"
    layout = Layout(prefix=Path(sys.prefix), root=root, config_dir=site.root)
    apply(plan(layout))
    hook = root / "etc/libvirt/hooks/qemu.d/50-migsec"
    # no MIGSEC_CONFIG: libvirt's environment is minimal, the path is in the script
    r = subprocess.run([str(hook), "vm1", "migrate", "begin", "-"], input=b"<domain/>",
                       capture_output=True, env={"PATH": "/usr/bin:/bin"}, timeout=60, check=False)
    assert r.returncode == 1
    assert f"allow_native_migration = true in {site.config}" in r.stderr.decode()


def test_refuses_without_migsecd_in_the_prefix(tmp_path):
    r = CliRunner().invoke(main, ["install", "--root", str(tmp_path / "r"), "--prefix", str(tmp_path)])
    assert r.exit_code == 2 and f"no migsecd in {tmp_path}/bin" in r.output


def test_refuses_a_source_that_is_not_a_checkout(tmp_path):
    with pytest.raises(ConfigError, match="not a migsec checkout"):
        plan(Layout(prefix=Path(sys.prefix), root=tmp_path / "r", source=tmp_path))


def test_a_file_where_a_directory_belongs_is_an_error(tmp_path):
    root = tmp_path / "root"
    (root / "var/lib").mkdir(parents=True)
    (root / "var/lib/migsec").write_text("not a dir")
    r = CliRunner().invoke(main, ["install", "--root", str(root)])
    assert r.exit_code == 2 and "exists but is not a directory" in r.output

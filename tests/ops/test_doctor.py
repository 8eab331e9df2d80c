"""`migsec doctor` against a real domain setup in a temporary directory."""
from __future__ import annotations

import datetime as dt
import socket
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from migsec.cli import main
from migsec.ops.checks import FAIL, OK, WARN, run_checks
from migsec.ops.layout import Layout, apply, plan
from migsec.pki import PeerDirectory
from migsec.policy import render_default_policies

from .conftest import make_site


@pytest.fixture
def host(tmp_path):
    """A complete host: site files, policies, installed hook + unit, a live control socket."""
    site = make_site(tmp_path / "site")
    render_default_policies(["cloud-a.example"], 8, 16, 100, site.root / "policies")
    root = tmp_path / "root"
    apply(plan(Layout(prefix=Path(sys.prefix), root=root, config_dir=site.root)))
    control = socket.socket(socket.AF_UNIX)
    control.bind(str(site.root / "run" / "migsecd.sock"))
    control.listen()
    peer = socket.create_server(("127.0.0.1", 0))
    PeerDirectory(site.root / "peers.json").add("cloud-a.example", f"127.0.0.1:{peer.getsockname()[1]}",
                                                fingerprint="SHA256:" + "ab" * 32)
    site.hooks_dir = root / "etc/libvirt/hooks"
    site.unit = root / "etc/systemd/system/migsecd.service"
    yield site
    control.close()
    peer.close()


def doctor(site, **kw):
    checks = run_checks(site.config, hooks_dir=site.hooks_dir, unit=site.unit, peer_timeout=1, **kw)
    return {c.name: c for c in checks}


def test_a_healthy_host_is_all_ok(host):
    r = CliRunner().invoke(main, ["doctor", "--config", str(host.config), "--hooks-dir",
                                  str(host.hooks_dir), "--unit", str(host.unit)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines and all(line.startswith("OK ") for line in lines), r.output
    names = [line.split(":")[0].split(None, 1)[1] for line in lines]
    assert names == ["config", "config files", "permissions domain key", "permissions sk3",
                     "permissions user database", "certificate", "policies", "state directory",
                     "image directory", "libvirt", "libvirt hook", "systemd unit", "migsecd",
                     "peer cloud-a.example"]


def test_group_readable_key_fails_with_the_fix(host):
    key = host.root / "pki" / "domain-key.pem"
    key.chmod(0o640)
    r = CliRunner().invoke(main, ["doctor", "--config", str(host.config), "--hooks-dir",
                                  str(host.hooks_dir), "--unit", str(host.unit)])
    assert r.exit_code == 1
    assert f"FAIL permissions domain key: {key} is mode 0640; secrets must be 0600 -- fix: chmod 600 {key}" in r.output
    assert "FAIL config files:" in r.output and "group-readable" in r.output


def test_certificate_near_expiry_warns_and_expired_fails(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    soon = make_site(tmp_path / "soon", days=10)
    render_default_policies(["cloud-a.example"], 8, 16, 100, soon.root / "policies")
    c = {x.name: x for x in run_checks(soon.config, hooks_dir=tmp_path, unit=tmp_path / "u", libvirt=False)}
    assert c["certificate"].status == WARN and "in 9 days" in c["certificate"].message
    gone = make_site(tmp_path / "gone", days=1, now=now - dt.timedelta(days=3))
    c = {x.name: x for x in run_checks(gone.config, hooks_dir=tmp_path, unit=tmp_path / "u", libvirt=False)}
    assert c["certificate"].status == FAIL
    assert "migsec ca issue --did cloud-b.example" in c["certificate"].fix


def test_certificate_of_another_domain_fails(host):
    host.write_config(domain='id = "cloud-z.example"\nkey = "pki/domain-key.pem"\n'
                             'certificate = "pki/domain-cert.pem"\ntrust = ["pki/ca-cert.pem"]')
    c = doctor(host)
    assert c["certificate"].status == FAIL and "'cloud-b.example'" in c["certificate"].message


def test_hook_missing_or_not_executable_fails(host):
    hook = host.hooks_dir / "qemu.d" / "50-migsec"
    hook.chmod(0o644)
    c = doctor(host)
    assert c["libvirt hook"].status == FAIL and "not executable" in c["libvirt hook"].message
    hook.unlink()
    c = doctor(host)
    assert c["libvirt hook"].status == FAIL and "not installed" in c["libvirt hook"].message


def test_hook_reading_another_config_warns(host, tmp_path):
    other = tmp_path / "other-root"
    apply(plan(Layout(prefix=Path(sys.prefix), root=other)))  # default /etc/migsec config
    c = run_checks(host.config, hooks_dir=other / "etc/libvirt/hooks", unit=host.unit, libvirt=False)
    hook = {x.name: x for x in c}["libvirt hook"]
    assert hook.status == WARN and "/etc/migsec/migsecd.toml" in hook.message


def test_policies_missing_or_broken_fail(host):
    for p in (host.root / "policies").glob("*.xml"):
        p.unlink()
    c = doctor(host)
    assert c["policies"].status == FAIL and "holds no *.xml policy" in c["policies"].message
    (host.root / "policies" / "root.xml").write_text("<PolicySet>")
    assert doctor(host)["policies"].status == FAIL


def test_unreachable_peer_warns(host):
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    PeerDirectory(host.root / "peers.json").add("cloud-c.example", f"127.0.0.1:{port}",
                                                fingerprint="SHA256:" + "cd" * 32)
    c = doctor(host)
    assert c["peer cloud-a.example"].status == OK
    assert c["peer cloud-c.example"].status == WARN and "unreachable" in c["peer cloud-c.example"].message


def test_daemon_not_running_and_libvirt_unreachable(host):
    (host.root / "run" / "migsecd.sock").unlink()
    host.write_config(libvirt=f'uri = "qemu+unix:///system?socket={host.root}/no-such-sock"')
    c = doctor(host)
    assert c["migsecd"].status == WARN
    assert c["libvirt"].status == FAIL and "systemctl start libvirtd" in c["libvirt"].fix


def test_broken_config_is_one_fail_line(tmp_path):
    cfg = tmp_path / "migsecd.toml"
    cfg.write_text("[domain]\nid = 'cloud-b.example'\nbogus = 1\n")
    r = CliRunner().invoke(main, ["doctor", "--config", str(cfg)])
    assert r.exit_code == 1
    assert r.output.startswith("FAIL config: ") and "[domain].bogus: unknown setting" in r.output


def test_hook_newer_than_the_running_libvirtd_warns(host, tmp_path):
    import os

    pid_file = tmp_path / "libvirtd.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # a process that started before the hook was written
    written_later = time.time() + 60  # well after this process started, past any clock slack
    os.utime(host.hooks_dir / "qemu.d" / "50-migsec", (written_later, written_later))
    hook = {c.name: c for c in run_checks(host.config, hooks_dir=host.hooks_dir, unit=host.unit,
                                          libvirt=False, libvirtd_pid_file=pid_file)}["libvirt hook"]
    assert hook.status == WARN and hook.fix == "systemctl restart libvirtd"
    old = host.hooks_dir / "qemu.d" / "50-migsec"
    os.utime(old, (0, 0))  # installed long before that process started
    hook = {c.name: c for c in run_checks(host.config, hooks_dir=host.hooks_dir, unit=host.unit,
                                          libvirt=False, libvirtd_pid_file=pid_file)}["libvirt hook"]
    assert hook.status == OK


def test_image_directories_take_a_staged_disk_and_say_which_file_system(host, tmp_path):
    import os
    import tempfile

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (/dev/shm) next to the temporary directory")
    other = Path(tempfile.mkdtemp(prefix="migsec-doctor-", dir="/dev/shm"))
    try:
        text = host.config.read_text().replace('"/src/images" = ', f'"/far/images" = "{other}", "/src/images" = ')
        host.config.write_text(text)
        checks = doctor(host, libvirt=False)
        assert checks["image directory"].status == OK
        assert "the same file system as" in checks["image directory"].message
        mapped = checks[f"image directory {other}"]
        assert mapped.status == OK and "another file system than" in mapped.message, mapped
        assert list(other.iterdir()) == []  # the probe file is gone again
        os.chmod(other, 0o500)
        if os.access(other, os.W_OK):  # root ignores the mode: take the directory away instead
            os.rmdir(other)
            assert doctor(host, libvirt=False)[f"image directory {other}"].status == FAIL
        else:
            failed = doctor(host, libvirt=False)[f"image directory {other}"]
            assert failed.status == FAIL and "write" in failed.fix
    finally:
        import shutil

        shutil.rmtree(other, ignore_errors=True)


def test_hook_interpreter_without_migsec_fails(host):
    hook = host.hooks_dir / "qemu.d" / "50-migsec"
    text = hook.read_text().split("\n", 1)
    hook.write_text("#!/usr/bin/python3 -I\n" + text[1])  # a Python that has no migsec
    check = doctor(host)["libvirt hook"]
    assert check.status == FAIL and "cannot import migsec" in check.message and "/usr/bin/python3" in check.message
    assert "migsec install --prefix" in check.fix


def test_peer_certificate_from_an_untrusted_ca_fails(host, tmp_path):
    from migsec.pki import CertificateAuthority

    rogue = CertificateAuthority.create(tmp_path / "rogue", "Rogue CA")
    cert = rogue.issue_domain("cloud-a.example", tmp_path / "rogue-a")
    peers = PeerDirectory(host.root / "peers.json")
    address = peers.get("cloud-a.example").address
    peers.add("cloud-a.example", address, cert_pem=cert.read_bytes(), replace=True)
    check = doctor(host)["peer cloud-a.example"]
    assert check.status == FAIL and "Rogue CA" in check.message and "does not chain" in check.message
    assert "[domain].trust" in check.fix and "--replace" in check.fix
    # the domain's own CA issued it: OK
    good = host.ca.issue_domain("cloud-a.example", tmp_path / "good-a")
    peers.add("cloud-a.example", address, cert_pem=good.read_bytes(), replace=True)
    assert doctor(host)["peer cloud-a.example"].status == OK


def test_policies_not_reachable_from_the_root_fail(host):
    extra = (host.root / "policies" / "source.xml").read_text().replace(
        'PolicyId="urn:migsec:policy:source"', 'PolicyId="urn:example:forgotten"')
    (host.root / "policies" / "forgotten.xml").write_text(extra)
    check = doctor(host)["policies"]
    assert check.status == FAIL and "not reachable from the root" in check.message
    assert "urn:example:forgotten (forgotten.xml)" in check.message

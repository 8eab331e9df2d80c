"""load_config: the schema, defaults, and an error naming the setting for each bad input."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migsec.config import config_path, did_problem, load_config, parse_address
from migsec.errors import ConfigError


@pytest.fixture(autouse=True)
def _helpers(minimal, write_file):
    global MINIMAL, write
    MINIMAL, write = minimal, write_file


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "migsecd.toml"


def load(site: Path, text: str):
    return load_config(write(site / "migsecd.toml", text))


def test_minimal_config_gets_documented_defaults(site):
    cfg = load(site, MINIMAL)
    assert cfg.domain.id == "cloud-a.example"
    assert cfg.domain.key == site / "pki/domain-key.pem"  # relative to the file
    assert cfg.domain.crls == ()
    assert cfg.paths.journal_dir == site / "state/journal"
    assert cfg.paths.source_policies == site / "policies/source"
    assert (cfg.listen.peer_host, cfg.listen.peer_port) == ("0.0.0.0", 7443)
    assert cfg.listen.control_socket == Path("/run/migsec/migsecd.sock")
    assert cfg.listen.socket_mode == 0o660 and cfg.listen.socket_group is None
    assert cfg.libvirt.uri == "qemu:///system"
    assert cfg.storage.image_dir == site / "state/images"
    assert cfg.limits.ticket_lifetime_s == 300 and cfg.limits.clock_skew_s == 60
    assert cfg.limits.bandwidth_mib_s == 0
    assert cfg.hooks.allow_native_migration is False
    assert cfg.recovery.auto is True


def test_full_config_is_read(site):
    cfg = load(site, MINIMAL + """
[listen]
peer = "[2001:db8::1]:8443"
control_socket = "run/migsecd.sock"
socket_group = "migsec"
socket_mode = 0o640

[libvirt]
uri = "qemu+unix:///system?socket=/x/libvirt-sock"

[storage]
image_dir = "/srv/images"
map = { "/var/lib/libvirt/images" = "/srv/images" }

[network]
map = { default = "lab" }
bridge_map = { br0 = "br1" }

[limits]
max_incoming = 3
max_vcpus = 8
max_memory_mib = 4096
bandwidth_mib_s = 100
ticket_lifetime_s = 120
clock_skew_s = 5

[hooks]
allow_native_migration = true

[recovery]
auto = false
""")
    assert (cfg.listen.peer_host, cfg.listen.peer_port) == ("2001:db8::1", 8443)
    assert cfg.listen.peer == "[2001:db8::1]:8443"
    assert cfg.listen.socket_mode == 0o640 and cfg.listen.socket_group == "migsec"
    assert cfg.storage.map["/var/lib/libvirt/images"] == "/srv/images"
    assert dict(cfg.network.map) == {"default": "lab"}
    assert dict(cfg.network.bridge_map) == {"br0": "br1"}
    assert (cfg.limits.max_incoming, cfg.limits.max_vcpus, cfg.limits.max_memory_mib) == (3, 8, 4096)
    assert cfg.limits.ticket_lifetime_s == 120 and cfg.hooks.allow_native_migration
    assert cfg.recovery.auto is False
    with pytest.raises(Exception):
        cfg.limits.max_vcpus = 1  # frozen
    with pytest.raises(TypeError):
        cfg.network.map["x"] = "y"  # read-only


def test_shipped_example_parses(site):
    text = EXAMPLE.read_text()
    cfg = load_config(write(site / "example.toml", text), check_files=False)
    assert cfg.domain.id


@pytest.mark.parametrize("mode, word", [(0o640, "group-readable"), (0o604, "other-readable")])
def test_key_readable_by_others_is_refused(site, mode, word):
    os.chmod(site / "pki/domain-key.pem", mode)
    with pytest.raises(ConfigError) as err:
        load(site, MINIMAL)
    msg = str(err.value)
    assert "migsecd.toml: [domain].key: file" in msg and word in msg and "0600" in msg


def test_unsafe_sk3_and_users_files_are_refused(site):
    write(site / "sk3.key", "x", 0o644)
    with pytest.raises(ConfigError, match=r"\[paths\]\.sk3: .*group-readable"):
        load(site, MINIMAL)
    os.chmod(site / "sk3.key", 0o600)
    write(site / "users.json", "{}", 0o640)
    with pytest.raises(ConfigError, match=r"\[paths\]\.users: .*group-readable"):
        load(site, MINIMAL)


def test_check_files_false_skips_file_checks_only(site):
    shutil.rmtree(site / "pki")
    with pytest.raises(ConfigError, match=r"\[domain\]\.key: file .* does not exist"):
        load(site, MINIMAL)
    cfg = load_config(site / "migsecd.toml", check_files=False)
    assert cfg.domain.id == "cloud-a.example"
    write(site / "migsecd.toml", MINIMAL.replace("cloud-a.example", "Cloud_A"))
    with pytest.raises(ConfigError, match=r"\[domain\]\.id"):
        load_config(site / "migsecd.toml", check_files=False)


@pytest.mark.parametrize("old, new, setting, problem", [
    ('id = "cloud-a.example"', 'id = "cloud a"', "[domain].id", "invalid domain id"),
    ('id = "cloud-a.example"', 'id = "-a.example"', "[domain].id", "invalid domain id"),
    ('id = "cloud-a.example"', "id = 7", "[domain].id", "must be a string"),
    ('id = "cloud-a.example"\n', "", "[domain].id", "missing setting"),
    ('trust = ["pki/ca-cert.pem"]', "trust = []", "[domain].trust", "at least one"),
    ('trust = ["pki/ca-cert.pem"]', 'trust = ["pki/nope.pem"]', "[domain].trust[0]",
     "does not exist"),
    ('trust = ["pki/ca-cert.pem"]', 'trust = "pki/ca-cert.pem"', "[domain].trust", "must be a list"),
    ('certificate = "pki/domain-cert.pem"', 'certificate = "pki"', "[domain].certificate",
     "not a regular file"),
    ('policy_dir = "policies"', 'policy_dir = "nowhere"', "[paths].policy_dir", "does not exist"),
    ('sk3 = "sk3.key"', 'sk3 = "sk3.key"\ncolour = "blue"', "[paths].colour", "unknown setting"),
])
def test_bad_settings_are_named(site, old, new, setting, problem):
    assert old in MINIMAL
    with pytest.raises(ConfigError) as err:
        load(site, MINIMAL.replace(old, new))
    assert f"migsecd.toml: {setting}: " in str(err.value)
    assert problem in str(err.value)


@pytest.mark.parametrize("extra, setting, problem", [
    ('[listen]\npeer = "host:99999"', "[listen].peer", "1..65535"),
    ('[listen]\npeer = "host"', "[listen].peer", "missing ':PORT'"),
    ('[listen]\npeer = "::1:7443"', "[listen].peer", "[ADDRESS]:PORT"),
    ('[listen]\npeer = "bad_host!:7443"', "[listen].peer", "not a host name"),
    ("[listen]\nsocket_mode = 0o666", "[listen].socket_mode", "other users"),
    ('[listen]\nsocket_mode = "rw"', "[listen].socket_mode", "not an octal mode"),
    ('[libvirt]\nuri = "qemu"', "[libvirt].uri", "not a libvirt URI"),
    ('[storage]\nmap = { "images" = "/srv" }', "[storage].map.'images'", "absolute"),
    ("[limits]\nmax_incoming = 0", "[limits].max_incoming", "out of range"),
    ("[limits]\nmax_vcpus = -1", "[limits].max_vcpus", "out of range"),
    ("[limits]\nbandwidth_mib_s = true", "[limits].bandwidth_mib_s", "not a boolean"),
    ('[limits]\nclock_skew_s = "60"', "[limits].clock_skew_s", "must be an integer"),
    ('[hooks]\nallow_native_migration = "yes"', "[hooks].allow_native_migration", "true or false"),
    ("[recovery]\nauto = 1", "[recovery].auto", "true or false"),
    ("[recovery]\nautomatic = true", "[recovery].automatic", "unknown setting"),
    ("[bogus]\nx = 1", "[bogus]", "unknown table"),
])
def test_bad_optional_settings_are_named(site, extra, setting, problem):
    with pytest.raises(ConfigError) as err:
        load(site, MINIMAL + "\n" + extra + "\n")
    assert f"{setting}: " in str(err.value) and problem in str(err.value)


def test_missing_and_malformed_files(site, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(site, "[domain\n")
    with pytest.raises(ConfigError, match=r"\[domain\]: missing table"):
        load(site, "[libvirt]\n")


def test_config_path_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MIGSEC_CONFIG", raising=False)
    assert config_path(None) == Path("/etc/migsec/migsecd.toml")
    monkeypatch.setenv("MIGSEC_CONFIG", str(tmp_path / "env.toml"))
    assert config_path(None) == tmp_path / "env.toml"
    assert config_path(tmp_path / "opt.toml") == tmp_path / "opt.toml"


def test_address_and_did_helpers():
    assert parse_address("198.18.0.2:7443") == ("198.18.0.2", 7443)
    assert parse_address("cloud-b.example", default_port=7443) == ("cloud-b.example", 7443)
    assert parse_address("[::1]:1") == ("::1", 1)
    for bad in ("", ":7443", "a:0", "[::1", "[nothex]:1", "1.2.3:5"):
        with pytest.raises(ValueError):
            parse_address(bad)
    assert did_problem("cloud-b.example") is None
    assert did_problem("a" * 64) is not None
    assert did_problem("UPPER.example") is not None


_toml_values = st.recursive(
    st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=12)
    | st.sampled_from(["0.0.0.0:1", "[::1]:7443", "/abs", "rel", "qemu:///system", "0660"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.sampled_from(["domain", "paths", "listen", "libvirt", "storage", "network",
                              "limits", "hooks", "recovery"]),
       key=st.text(min_size=1, max_size=16) | st.sampled_from(
           ["id", "trust", "crls", "peer", "socket_mode", "map", "bridge_map", "max_incoming",
            "clock_skew_s", "allow_native_migration", "uri", "image_dir", "state_dir"]),
       value=_toml_values)
def test_any_value_gives_a_config_or_a_config_error(site, table, key, value):
    import tomllib

    raw = tomllib.loads(MINIMAL)
    raw.setdefault(table, {})[key] = value
    from migsec.config import _Loader

    try:
        _Loader(site / "migsecd.toml", raw, check_files=True).config()
    except ConfigError as exc:
        assert str(exc).startswith(f"{site / 'migsecd.toml'}: [")

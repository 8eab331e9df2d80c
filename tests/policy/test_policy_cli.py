"""``migsec policy`` through the real click group."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from migsec.cli import main
from migsec.policy import DEFAULT_DIR

DATA = Path(__file__).resolve().parents[1] / "data" / "policy"


def run(*args: str):
    return CliRunner().invoke(main, ["policy", *args], catch_exceptions=False)


def test_eval_xml_request_with_references(tmp_path):
    r = run("eval", "--policy", str(DEFAULT_DIR / "root.xml"), "--policy", str(DEFAULT_DIR / "source.xml"),
            "--policy", str(DEFAULT_DIR / "destination.xml"), "--request", str(DATA / "receive-request.xml"))
    assert r.exit_code == 0, r.output
    assert "<Decision>Permit</Decision>" in r.output
    assert "urn:migsec:obligation:max-bandwidth" in r.output


def test_eval_json_request_answers_json():
    r = run("eval", "--policy", str(DEFAULT_DIR / "root.xml"), "--policy", str(DEFAULT_DIR / "source.xml"),
            "--policy", str(DEFAULT_DIR / "destination.xml"), "--request", str(DATA / "migrate-request.json"))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["Response"][0]["Decision"] == "Deny"  # the destination in that request is not trusted


def test_eval_missing_reference_fails_with_message():
    r = run("eval", "--policy", str(DEFAULT_DIR / "root.xml"), "--request", str(DATA / "receive-request.xml"))
    assert r.exit_code != 0
    assert "undefined Policy 'urn:migsec:policy:source'" in r.output


def test_eval_bad_request_fails_with_message(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"Request": {"Resource": {"Attribute": [{"AttributeId": "x"}]}}}')
    r = run("eval", "--policy", str(DEFAULT_DIR / "destination.xml"), "--request", str(bad))
    assert r.exit_code != 0
    assert "missing Value" in r.output


def test_check_reports_ok_and_errors(tmp_path):
    r = run("check", str(DEFAULT_DIR))
    assert r.exit_code == 0 and "root PolicySet urn:migsec:policy:root" in r.output
    shutil.copy(DATA / "invalid-type.xml", tmp_path / "p.xml")
    r = run("check", str(tmp_path))
    assert r.exit_code != 0
    assert "p.xml:" in r.output and "<Apply>" in r.output and "integer-add argument 2" in r.output
    r = run("check", str(tmp_path / "p.xml"))
    assert r.exit_code != 0 and "integer-add argument 2" in r.output
    r = run("check", str(DEFAULT_DIR / "root.xml"), str(DEFAULT_DIR / "source.xml"), str(DEFAULT_DIR / "destination.xml"))
    assert r.exit_code == 0 and "ok: 3 policies" in r.output


def test_init_defaults_writes_loadable_policies_and_refuses_overwrite(tmp_path):
    r = run("init-defaults", str(tmp_path), "--trusted", "dc1.example", "--trusted", "dc2.example",
            "--max-vcpus", "4", "--max-memory-gib", "8", "--bandwidth-mib-s", "42")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "destination.xml").read_text()
    assert "dc2.example" in text and ">42<" in text and str(8 * 1024**3) in text
    r = run("init-defaults", str(tmp_path), "--trusted", "dc1.example")
    assert r.exit_code != 0 and "--force" in r.output
    r = run("init-defaults", str(tmp_path), "--trusted", "bad domain!", "--force")
    assert r.exit_code != 0 and "not a valid domain id" in r.output

"""The one policy-directory loader (migsecd, doctor, `migsec policy check`): one root, every
policy reachable from it, the source/ + destination/ layout."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from migsec.cli import main
from migsec.errors import PolicyError, PolicyReferenceError
from migsec.policy import PDP
from migsec.policy.defaults import DEFAULT_DIR
from migsec.policy.loader import load_policy_dir, load_policy_directory

NS = 'xmlns="urn:oasis:names:tc:xacml:3.0:core:schema:wd-17"'
ALG = "urn:oasis:names:tc:xacml:3.0:policy-combining-algorithm:deny-unless-permit"


def policy(pid: str) -> str:
    return (f'<Policy {NS} PolicyId="{pid}" Version="1.0" RuleCombiningAlgId='
            f'"urn:oasis:names:tc:xacml:3.0:rule-combining-algorithm:deny-unless-permit"><Target/>'
            f'<Rule RuleId="r" Effect="Permit"/></Policy>')


def policy_set(pid: str, *refs: str) -> str:
    body = "".join(f"<PolicyIdReference>{r}</PolicyIdReference>" for r in refs)
    return f'<PolicySet {NS} PolicySetId="{pid}" Version="1.0" PolicyCombiningAlgId="{ALG}"><Target/>{body}</PolicySet>'


@pytest.fixture
def shipped(tmp_path) -> Path:
    d = tmp_path / "policies"
    shutil.copytree(DEFAULT_DIR, d)
    return d


def test_shipped_set_loads_with_its_root(shipped):
    store = load_policy_directory(shipped)
    assert store.root.id == "urn:migsec:policy:root" and len(store.by_file) == 3
    assert PDP.from_directory(shipped).store.root.id == store.root.id


def test_an_unreferenced_extra_policy_is_refused_by_name(shipped):
    (shipped / "extra.xml").write_text(policy("urn:example:extra"))
    with pytest.raises(PolicyReferenceError, match=r"not reachable from the root PolicySet urn:migsec:policy:root "
                                                   r"\(root.xml\).*Policy urn:example:extra \(extra.xml\)"):
        load_policy_directory(shipped)


def test_a_policy_only_an_unreachable_one_references_is_named_too(shipped):
    (shipped / "extra.xml").write_text(policy_set("urn:example:island", "urn:example:helper"))
    (shipped / "helper.xml").write_text(policy("urn:example:helper"))
    with pytest.raises(PolicyReferenceError) as info:
        load_policy_directory(shipped)
    assert "urn:example:island (extra.xml)" in str(info.value) and "urn:example:helper (helper.xml)" in str(info.value)


def test_two_roots_without_root_xml_is_refused(tmp_path):
    (tmp_path / "a.xml").write_text(policy("urn:example:a"))
    (tmp_path / "b.xml").write_text(policy("urn:example:b"))
    with pytest.raises(PolicyReferenceError, match="exactly one root policy.*found 2"):
        load_policy_directory(tmp_path)
    (tmp_path / "b.xml").unlink()
    assert load_policy_directory(tmp_path).root.id == "urn:example:a"


def test_policy_dir_layouts(tmp_path, shipped):
    single = load_policy_dir(shipped)
    assert not single.split and single.source is single.destination and single.count == 3
    split = tmp_path / "split"
    shutil.copytree(shipped, split / "source")
    (split / "destination").mkdir()
    (split / "destination" / "d.xml").write_text(policy("urn:example:dest"))
    loaded = load_policy_dir(split)
    assert loaded.split and loaded.destination.root.id == "urn:example:dest" and loaded.count == 4
    shutil.rmtree(split / "destination")
    with pytest.raises(PolicyError, match="has source/ but not destination/"):
        load_policy_dir(split)
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy_dir(tmp_path / "none")


def test_policy_check_and_doctor_refuse_what_migsecd_refuses(shipped):
    r = CliRunner().invoke(main, ["policy", "check", str(shipped)])
    assert r.exit_code == 0 and "root PolicySet urn:migsec:policy:root (root.xml)" in r.output, r.output
    (shipped / "extra.xml").write_text(policy("urn:example:extra"))
    r = CliRunner().invoke(main, ["policy", "check", str(shipped)])
    assert r.exit_code != 0 and "not reachable from the root" in r.output and "extra.xml" in r.output

"""The shipped migration policies and authorize(), evaluated on permit and deny cases."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from migsec.errors import ConfigError, RequestSyntaxError
from migsec.policy import DEFAULT_DIR, PDP, authorize, render_default_policies
from migsec.policy import attributes as A
from migsec.policy.defaults import SHIPPED

GIB = 1024**3


@pytest.fixture(scope="module")
def pdp() -> PDP:
    return PDP.from_directory(DEFAULT_DIR)


def ask(pdp, *, roles=("migration-admin",), action="migrate", src="cloud-a.example", dst="cloud-b.example",
        vcpus=2, memory=2 * GIB, user="alice"):
    return authorize(pdp, subject={"user-id": user, "roles": list(roles), "source-domain": src},
                     resource={"vm-name": "vm1", "vm-uuid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                               "vcpus": vcpus, "memory-bytes": memory, "disk-bytes": 10 * GIB, "tags": ["web"]},
                     action=action, environment={"source-domain": src, "destination-domain": dst})


def test_source_permits_admin_to_trusted_domain(pdp):
    d = ask(pdp)
    assert d.decision == "Permit" and d.permitted
    assert d.obligations == []


@pytest.mark.parametrize("roles", [(), ("operator",), ("migration-admins",), ("Migration-Admin",)])
def test_source_denies_without_the_role(pdp, roles):
    d = ask(pdp, roles=roles)
    assert d.decision == "Deny"
    assert d.advice[0].id == A.ADVICE_REASON


def test_source_denies_untrusted_destination(pdp):
    assert ask(pdp, dst="evil.example").decision == "Deny"


def test_destination_permits_within_limits_with_bandwidth_obligation(pdp):
    d = ask(pdp, action=A.ACTION_RECEIVE, vcpus=8, memory=16 * GIB)
    assert d.decision == "Permit"
    [obl] = d.obligations
    assert obl.id == A.OBLIGATION_MAX_BANDWIDTH
    assert obl.attributes == {A.ASSIGN_BANDWIDTH_MIB_S: SHIPPED["bandwidth_mib_s"]}


@pytest.mark.parametrize("kw", [dict(src="evil.example"), dict(vcpus=9), dict(memory=16 * GIB + 1)])
def test_destination_denies(pdp, kw):
    d = ask(pdp, action=A.ACTION_RECEIVE, **kw)
    assert d.decision == "Deny"
    assert d.obligations == []


def test_unknown_action_is_denied(pdp):
    assert ask(pdp, action="delete").decision == "Deny"


def test_missing_attribute_is_not_a_permit(pdp):
    d = authorize(pdp, subject={"roles": ["migration-admin"]}, resource={"vm-name": "vm1"},
                  action=A.ACTION_RECEIVE, environment={"source-domain": "cloud-a.example"})
    assert d.decision == "Deny"


def test_render_with_operator_values(tmp_path):
    render_default_policies(["dc1.example"], 4, 8, 50, tmp_path, accept_from=["dc2.example"])
    pdp = PDP.from_directory(tmp_path)
    assert ask(pdp, dst="dc1.example").decision == "Permit"
    assert ask(pdp, dst="cloud-b.example").decision == "Deny"
    d = ask(pdp, action=A.ACTION_RECEIVE, src="dc2.example", vcpus=4, memory=8 * GIB)
    assert d.decision == "Permit" and d.obligations[0].attributes[A.ASSIGN_BANDWIDTH_MIB_S] == 50
    assert ask(pdp, action=A.ACTION_RECEIVE, src="dc1.example", vcpus=4, memory=8 * GIB).decision == "Deny"
    assert ask(pdp, action=A.ACTION_RECEIVE, src="dc2.example", vcpus=5).decision == "Deny"


def test_shipped_files_match_the_renderer(tmp_path):
    render_default_policies(**SHIPPED, out_dir=tmp_path)
    for name in ("root.xml", "source.xml", "destination.xml"):
        assert (tmp_path / name).read_bytes() == (DEFAULT_DIR / name).read_bytes(), name


@pytest.mark.parametrize("kw, word", [
    (dict(trusted_domains=[]), "trusted_domains"),
    (dict(trusted_domains=["a b"]), "domain id"),
    (dict(trusted_domains=["<x>"]), "domain id"),
    (dict(max_vcpus=0), "max_vcpus"),
    (dict(max_memory_gib="8"), "max_memory_gib"),
])
def test_render_refuses_bad_settings(tmp_path, kw, word):
    args = dict(SHIPPED, out_dir=tmp_path)
    args.update(kw)
    with pytest.raises(ConfigError, match=word):
        render_default_policies(**args)


def test_authorize_rejects_unknown_or_mistyped_attributes(pdp):
    with pytest.raises(RequestSyntaxError, match="unknown attribute 'cpus'"):
        authorize(pdp, subject={}, resource={"cpus": 2}, action="migrate", environment={})
    with pytest.raises(RequestSyntaxError, match="vcpus"):
        authorize(pdp, subject={}, resource={"vcpus": "2"}, action="migrate", environment={})
    with pytest.raises(RequestSyntaxError, match="one value"):
        authorize(pdp, subject={"user-id": ["a", "b"]}, resource={}, action="migrate", environment={})


def test_authorize_accepts_full_ids_and_time(tmp_path):
    (tmp_path / "p.xml").write_text(f"""<Policy xmlns="urn:oasis:names:tc:xacml:3.0:core:schema:wd-17"
      PolicyId="t" Version="1" RuleCombiningAlgId="urn:oasis:names:tc:xacml:3.0:rule-combining-algorithm:deny-unless-permit">
      <Target/><Rule RuleId="r" Effect="Permit"><Condition>
      <Apply FunctionId="urn:oasis:names:tc:xacml:1.0:function:and">
       <Apply FunctionId="urn:oasis:names:tc:xacml:1.0:function:integer-is-in">
        <AttributeValue DataType="http://www.w3.org/2001/XMLSchema#integer">3</AttributeValue>
        <AttributeDesignator Category="{A.RESOURCE}" AttributeId="urn:example:zone" MustBePresent="false"
          DataType="http://www.w3.org/2001/XMLSchema#integer"/></Apply>
       <Apply FunctionId="urn:oasis:names:tc:xacml:1.0:function:dateTime-less-than">
        <Apply FunctionId="urn:oasis:names:tc:xacml:1.0:function:dateTime-one-and-only">
         <AttributeDesignator Category="{A.ENVIRONMENT}" AttributeId="{A.CURRENT_DATETIME}" MustBePresent="true"
           DataType="http://www.w3.org/2001/XMLSchema#dateTime"/></Apply>
        <AttributeValue DataType="http://www.w3.org/2001/XMLSchema#dateTime">2030-01-01T00:00:00Z</AttributeValue>
       </Apply></Apply></Condition></Rule></Policy>""")
    pdp = PDP.from_directory(tmp_path)
    early = dt.datetime(2029, 12, 31, 23, 59, tzinfo=dt.timezone.utc)
    late = dt.datetime(2030, 1, 1, 0, 1, tzinfo=dt.timezone.utc)
    ok = authorize(pdp, subject={}, resource={"urn:example:zone": 3}, action="x", environment={"current-dateTime": early})
    assert ok.decision == "Permit"
    assert authorize(pdp, subject={}, resource={"urn:example:zone": 3}, action="x",
                     environment={"current-dateTime": late}).decision == "Deny"
    assert authorize(pdp, subject={}, resource={"urn:example:zone": 4}, action="x",
                     environment={"current-dateTime": early}).decision == "Deny"


def test_docs_list_every_attribute():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "policy.md").read_text()
    for spec in A.SPECS:
        assert f"`{spec.short}` | `{spec.id}`" in doc, spec.short

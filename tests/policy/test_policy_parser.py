"""Policy loading: unsafe XML refused, static errors named by file and element."""
from __future__ import annotations

from pathlib import Path

import json

import pytest
from hypothesis import given, settings, strategies as st

from migsec.errors import PolicyReferenceError, PolicySyntaxError, RequestSyntaxError, UnsafeXmlError
from migsec.policy import PDP, load_policies, parse_request

DATA = Path(__file__).resolve().parents[1] / "data" / "policy"
NS = 'xmlns="urn:oasis:names:tc:xacml:3.0:core:schema:wd-17"'
RCA = "urn:oasis:names:tc:xacml:3.0:rule-combining-algorithm:deny-overrides"
XS = "http://www.w3.org/2001/XMLSchema#"


@pytest.mark.parametrize("name", ["billion-laughs.xml", "xxe.xml"])
def test_entity_attacks_are_refused(name):
    with pytest.raises(UnsafeXmlError, match=f"{name}: XML with a DOCTYPE"):
        load_policies([DATA / name])


def test_entity_attack_in_a_request_is_refused():
    # also in UTF-16, where a byte search for ASCII "<!DOCTYPE" would miss it
    data = (b'<?xml version="1.0"?><!DOCTYPE Request [<!ENTITY s SYSTEM "file:///etc/passwd">]>'
            b'<Request xmlns="urn:oasis:names:tc:xacml:3.0:core:schema:wd-17"><Attributes Category="c">'
            b'<Attribute AttributeId="a"><AttributeValue DataType="http://www.w3.org/2001/XMLSchema#string">&s;'
            b'</AttributeValue></Attribute></Attributes></Request>')
    with pytest.raises(UnsafeXmlError):
        parse_request(data, "req.xml")
    with pytest.raises(UnsafeXmlError):
        parse_request(data.replace(b'"1.0"?>', b'"1.0" encoding="UTF-16"?>', 1).decode().encode("utf-16"), "req.xml")


def _policy(tmp_path: Path, body: str, extra: str = "") -> Path:
    p = tmp_path / "p.xml"
    p.write_text(f'<Policy {NS} PolicyId="p" Version="1.0" RuleCombiningAlgId="{RCA}" {extra}><Target/>{body}</Policy>')
    return p


def _cond(expr: str) -> str:
    return f'<Rule RuleId="r" Effect="Permit"><Condition>{expr}</Condition></Rule>'


def _v(dt: str, text: str) -> str:
    return f'<AttributeValue DataType="{XS}{dt}">{text}</AttributeValue>'


F = "urn:oasis:names:tc:xacml:1.0:function:"


@pytest.mark.parametrize("body, message", [
    (_cond(f'<Apply FunctionId="{F}integer-add">{_v("integer", "1")}{_v("string", "2")}</Apply>'),
     "<Apply>: urn:oasis:names:tc:xacml:1.0:function:integer-add argument 2: expected integer, got string"),
    (_cond(f'<Apply FunctionId="{F}no-such">{_v("integer", "1")}</Apply>'), "<Apply>: unknown function"),
    (_cond(_v("integer", "1")), "<Condition>: the Condition must be a boolean"),
    (_cond(f'<Apply FunctionId="{F}not">{_v("boolean", "maybe")}</Apply>'), "<AttributeValue>: not a boolean"),
    (_cond(f'<Apply FunctionId="{F}integer-one-and-only"><AttributeDesignator Category="c" '
           f'DataType="{XS}integer" MustBePresent="false"/></Apply>'), "<AttributeDesignator>: missing required attribute AttributeId"),
    (_cond('<VariableReference VariableId="nope"/>'), "undefined variable 'nope'"),
    ('<VariableDefinition VariableId="a"><VariableReference VariableId="b"/></VariableDefinition>'
     '<VariableDefinition VariableId="b"><VariableReference VariableId="a"/></VariableDefinition>', "circular variable reference"),
    ('<Rule RuleId="r" Effect="Permit"/><Rule RuleId="r" Effect="Deny"/>', "duplicate RuleId 'r'"),
    ('<Rule RuleId="r" Effect="Maybe"/>', "Effect must be Permit or Deny"),
    (_cond(f'<Apply FunctionId="urn:oasis:names:tc:xacml:3.0:function:string-equal">'
           f'<Apply FunctionId="urn:oasis:names:tc:xacml:3.0:function:string-substring">{_v("string", "abc")}'
           f'{_v("integer", "-2")}{_v("integer", "1")}</Apply>{_v("string", "a")}</Apply>'), "unknown function"),
])
def test_static_errors_name_file_line_and_element(tmp_path, body, message):
    with pytest.raises(PolicySyntaxError) as info:
        load_policies([_policy(tmp_path, body)])
    assert str(info.value).startswith(f"{tmp_path / 'p.xml'}:")
    assert message in str(info.value)


def test_constant_error_is_a_load_error(tmp_path):
    body = _cond(f'<Apply FunctionId="{F}string-equal"><Apply FunctionId="urn:oasis:names:tc:xacml:3.0:function:string-substring">'
                 f'{_v("string", "abc")}{_v("integer", "-2")}{_v("integer", "1")}</Apply>{_v("string", "a")}</Apply>')
    with pytest.raises(PolicySyntaxError, match="constant expression fails: substring indexes -2"):
        load_policies([_policy(tmp_path, body)])


def test_unknown_combining_algorithm(tmp_path):
    p = tmp_path / "p.xml"
    p.write_text(f'<Policy {NS} PolicyId="p" Version="1" RuleCombiningAlgId="urn:x"><Target/></Policy>')
    with pytest.raises(PolicySyntaxError, match="unknown rule-combining algorithm 'urn:x'"):
        load_policies([p])


def test_not_xacml_and_not_xml(tmp_path):
    p = tmp_path / "p.xml"
    p.write_text("<Policy/>")
    with pytest.raises(PolicySyntaxError, match="expected a Policy or PolicySet"):
        load_policies([p])
    p.write_text("<Policy")
    with pytest.raises(PolicySyntaxError, match="not well-formed"):
        load_policies([p])
    with pytest.raises(PolicySyntaxError, match="cannot read policy"):
        load_policies([tmp_path / "missing.xml"])


def _set(psid: str, refs: str) -> str:
    return (f'<PolicySet {NS} PolicySetId="{psid}" Version="1.0" '
            f'PolicyCombiningAlgId="urn:oasis:names:tc:xacml:3.0:policy-combining-algorithm:deny-overrides">'
            f'<Target/>{refs}</PolicySet>')


def test_reference_cycle_and_missing_reference(tmp_path):
    a, b = tmp_path / "a.xml", tmp_path / "b.xml"
    a.write_text(_set("A", "<PolicySetIdReference>B</PolicySetIdReference>"))
    b.write_text(_set("B", "<PolicySetIdReference>A</PolicySetIdReference>"))
    with pytest.raises(PolicyReferenceError, match="circular policy reference"):
        load_policies([a, b])
    b.write_text(_set("B", "<PolicyIdReference>C</PolicyIdReference>"))
    with pytest.raises(PolicyReferenceError, match="b.xml:1: PolicyIdReference to undefined Policy 'C'"):
        load_policies([a, b])


def test_directory_needs_one_root(tmp_path):
    (tmp_path / "a.xml").write_text(_set("A", ""))
    (tmp_path / "b.xml").write_text(_set("B", ""))
    with pytest.raises(PolicyReferenceError, match="exactly one root"):
        PDP.from_directory(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ('{"Request": {"Resource": {"Attribute": [{"Value": 1}]}}}', "missing AttributeId"),
    ('{"Request": {"Resource": {"Attribute": [{"AttributeId": "a", "Value": "x", "DataType": "integer"}]}}}', "not an integer"),
    ('{"Request": {"Bogus": {}}}', "unknown member Request.Bogus"),
    (f'<Request {NS}><Attributes Category="c"><Attribute AttributeId="a"><AttributeValue DataType="{XS}date">'
     f'2020-13-01</AttributeValue></Attribute></Attributes></Request>', "<AttributeValue>: not a date"),
    (f'<Request {NS}><Attributes Category="c"><Attribute><AttributeValue DataType="{XS}string">x'
     f'</AttributeValue></Attribute></Attributes></Request>', "<Attribute>: missing AttributeId"),
])
def test_bad_requests_are_named(text, message):
    with pytest.raises(RequestSyntaxError, match=message):
        parse_request(text.encode(), "req")


def test_directory_root_is_found_through_nested_references(tmp_path):
    # Leaf is referenced only from a PolicySet nested inside Root, not from a top-level element
    nested = _set("Inner", "<PolicySetIdReference>Leaf</PolicySetIdReference>").replace(f" {NS}", "")
    (tmp_path / "a-root.xml").write_text(_set("Root", nested))
    (tmp_path / "b-leaf.xml").write_text(_set("Leaf", ""))
    assert PDP.from_directory(tmp_path).store.root.id == "Root"


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                         st.sampled_from(["Request", "Resource", "Action", "Attribute", "AttributeId", "Value",
                                          "DataType", "Category", "CategoryId", "MultiRequests", "x"]), kids, max_size=4),
                     max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(_json)
def test_any_json_request_parses_or_is_refused_cleanly(doc):
    try:
        parse_request(json.dumps({"Request": doc}).encode(), "fuzz")
    except RequestSyntaxError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_cleanly(data):
    try:
        parse_request(b"<Request " + data, "fuzz")
    except (RequestSyntaxError, UnsafeXmlError):
        pass

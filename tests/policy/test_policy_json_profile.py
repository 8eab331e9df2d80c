"""Requests and responses in the JSON profile of XACML 3.0, checked against the XML path."""
from __future__ import annotations

import json
from pathlib import Path

from migsec.policy import PDP, parse_request
from migsec.policy.defaults import DEFAULT_DIR


def test_json_and_xml_requests_give_the_same_result():
    pdp = PDP.from_directory(DEFAULT_DIR)
    xml = (Path(__file__).resolve().parents[1] / "data" / "policy" / "receive-request.xml").read_bytes()
    js = json.dumps({"Request": {
        "AccessSubject": {"Attribute": [{"AttributeId": "urn:oasis:names:tc:xacml:1.0:subject:subject-id", "Value": "alice"}]},
        "Resource": {"Attribute": [{"AttributeId": "urn:migsec:resource:vcpus", "Value": 2},
                                   {"AttributeId": "urn:migsec:resource:memory-bytes", "Value": 1 << 30}]},
        "Action": {"Attribute": [{"AttributeId": "urn:oasis:names:tc:xacml:1.0:action:action-id",
                                  "Value": "receive-migration"}]},
        "Category": [{"CategoryId": "urn:oasis:names:tc:xacml:3.0:attribute-category:environment",
                      "Attribute": [{"AttributeId": "urn:migsec:environment:source-domain",
                                     "Value": "cloud-a.example", "IncludeInResult": True}]}],
    }}).encode()
    rx = pdp.evaluate(parse_request(xml)).results[0]
    rj_resp = pdp.evaluate(parse_request(js))
    rj = rj_resp.results[0]
    assert (rx.decision, rx.obligations) == (rj.decision, rj.obligations) == ("Permit", rx.obligations)
    out = json.loads(rj_resp.serialize())
    [result] = out["Response"]
    assert result["Decision"] == "Permit"
    assert result["Obligations"] == [{"Id": "urn:migsec:obligation:max-bandwidth", "AttributeAssignment": [
        {"AttributeId": "urn:migsec:obligation:bandwidth-mib-s", "Value": 100, "DataType": "integer"}]}]
    assert result["Category"] == [{"CategoryId": "urn:oasis:names:tc:xacml:3.0:attribute-category:environment",
                                   "Attribute": [{"AttributeId": "urn:migsec:environment:source-domain",
                                                  "Value": ["cloud-a.example"], "DataType": "string"}]}]


def test_missing_attribute_detail_in_xml_and_json(tmp_path):
    (tmp_path / "p.xml").write_text("""<Policy xmlns="urn:oasis:names:tc:xacml:3.0:core:schema:wd-17" PolicyId="p"
      Version="1" RuleCombiningAlgId="urn:oasis:names:tc:xacml:1.0:rule-combining-algorithm:first-applicable">
      <Target/><Rule RuleId="r" Effect="Permit"><Condition>
      <Apply FunctionId="urn:oasis:names:tc:xacml:1.0:function:integer-less-than-or-equal">
        <Apply FunctionId="urn:oasis:names:tc:xacml:1.0:function:integer-one-and-only">
          <AttributeDesignator Category="urn:oasis:names:tc:xacml:3.0:attribute-category:resource"
            AttributeId="urn:migsec:resource:vcpus" Issuer="libvirt" MustBePresent="true"
            DataType="http://www.w3.org/2001/XMLSchema#integer"/></Apply>
        <AttributeValue DataType="http://www.w3.org/2001/XMLSchema#integer">4</AttributeValue>
      </Apply></Condition></Rule></Policy>""")
    pdp = PDP.from_directory(tmp_path)
    # present, but from another issuer: still missing for this designator
    js = json.dumps({"Request": {"Resource": {"Attribute": [
        {"AttributeId": "urn:migsec:resource:vcpus", "Value": 2, "Issuer": "someone-else"}]}}}).encode()
    out = json.loads(pdp.evaluate(parse_request(js)).serialize())["Response"][0]
    assert out["Decision"] == "Indeterminate"
    assert out["Status"]["StatusCode"]["Value"] == "urn:oasis:names:tc:xacml:1.0:status:missing-attribute"
    assert out["Status"]["StatusDetail"]["MissingAttributeDetail"] == [{
        "Category": "urn:oasis:names:tc:xacml:3.0:attribute-category:resource",
        "AttributeId": "urn:migsec:resource:vcpus", "DataType": "http://www.w3.org/2001/XMLSchema#integer",
        "Issuer": "libvirt"}]
    xml = pdp.evaluate(parse_request(js)).to_xml()
    assert b'<MissingAttributeDetail Category="urn:oasis:names:tc:xacml:3.0:attribute-category:resource" ' \
           b'AttributeId="urn:migsec:resource:vcpus"' in xml
    js_ok = js.replace(b"someone-else", b"libvirt")
    assert pdp.evaluate(parse_request(js_ok)).results[0].decision == "Permit"


def test_json_multi_requests():
    pdp = PDP.from_directory(DEFAULT_DIR)
    js = json.dumps({"Request": {
        "Action": [{"Id": "mig", "Attribute": [{"AttributeId": "urn:oasis:names:tc:xacml:1.0:action:action-id", "Value": "migrate"}]}],
        "AccessSubject": [{"Id": "admin", "Attribute": [{"AttributeId": "urn:oasis:names:tc:xacml:2.0:subject:role", "Value": "migration-admin"}]},
                          {"Id": "user", "Attribute": [{"AttributeId": "urn:oasis:names:tc:xacml:2.0:subject:role", "Value": "user"}]}],
        "Environment": [{"Id": "env", "Attribute": [{"AttributeId": "urn:migsec:environment:destination-domain", "Value": "cloud-b.example"}]}],
        "MultiRequests": {"RequestReference": [{"ReferenceId": ["admin", "mig", "env"]}, {"ReferenceId": ["user", "mig", "env"]}]},
    }}).encode()
    out = json.loads(pdp.evaluate(parse_request(js)).serialize())["Response"]
    assert [r["Decision"] for r in out] == ["Permit", "Deny"]


def test_missing_attribute_status_survives_and(tmp_path):
    (tmp_path / "p.xml").write_text("""<Policy xmlns="urn:oasis:names:tc:xacml:3.0:core:schema:wd-17" PolicyId="p"
      Version="1" RuleCombiningAlgId="urn:oasis:names:tc:xacml:1.0:rule-combining-algorithm:first-applicable">
      <Target/><Rule RuleId="r" Effect="Permit"><Condition>
      <Apply FunctionId="urn:oasis:names:tc:xacml:1.0:function:and">
        <AttributeValue DataType="http://www.w3.org/2001/XMLSchema#boolean">true</AttributeValue>
        <Apply FunctionId="urn:oasis:names:tc:xacml:1.0:function:boolean-one-and-only">
          <AttributeDesignator Category="urn:oasis:names:tc:xacml:3.0:attribute-category:resource"
            AttributeId="urn:example:flag" MustBePresent="true"
            DataType="http://www.w3.org/2001/XMLSchema#boolean"/></Apply>
      </Apply></Condition></Rule></Policy>""")
    r = PDP.from_directory(tmp_path).evaluate(parse_request(b'{"Request": {}}')).results[0]
    assert r.decision == "Indeterminate"
    assert r.status.code == "urn:oasis:names:tc:xacml:1.0:status:missing-attribute"
    assert [m.attribute_id for m in r.status.missing] == ["urn:example:flag"]


def test_attribute_provider_is_asked_only_for_missing_attributes(tmp_path):
    asked = []

    def pip(category, attribute_id, datatype):
        asked.append(attribute_id)
        if attribute_id == "urn:migsec:resource:memory-bytes":
            raise OSError("libvirt unreachable")
        return [(None, 4)] if attribute_id == "urn:migsec:resource:vcpus" else []

    pdp = PDP.from_directory(DEFAULT_DIR, attribute_provider=pip)
    js = json.dumps({"Request": {
        "Action": {"Attribute": [{"AttributeId": "urn:oasis:names:tc:xacml:1.0:action:action-id", "Value": "receive-migration"}]},
        "Environment": {"Attribute": [{"AttributeId": "urn:migsec:environment:source-domain", "Value": "cloud-a.example"}]},
        "Resource": {"Attribute": [{"AttributeId": "urn:migsec:resource:memory-bytes", "Value": 1024}]}}}).encode()
    assert pdp.evaluate(parse_request(js)).results[0].decision == "Permit"
    assert "urn:migsec:resource:vcpus" in asked and "urn:migsec:resource:memory-bytes" not in asked
    # a failing provider makes the attribute Indeterminate (processing-error), not an exception
    (tmp_path / "p.xml").write_text("""<Policy xmlns="urn:oasis:names:tc:xacml:3.0:core:schema:wd-17" PolicyId="p"
      Version="1" RuleCombiningAlgId="urn:oasis:names:tc:xacml:1.0:rule-combining-algorithm:first-applicable">
      <Target/><Rule RuleId="r" Effect="Permit"><Condition>
      <Apply FunctionId="urn:oasis:names:tc:xacml:1.0:function:integer-is-in">
        <AttributeValue DataType="http://www.w3.org/2001/XMLSchema#integer">1024</AttributeValue>
        <AttributeDesignator Category="urn:oasis:names:tc:xacml:3.0:attribute-category:resource"
          AttributeId="urn:migsec:resource:memory-bytes" MustBePresent="false"
          DataType="http://www.w3.org/2001/XMLSchema#integer"/>
      </Apply></Condition></Rule></Policy>""")
    r = PDP.from_directory(tmp_path, attribute_provider=pip).evaluate(parse_request(b'{"Request": {}}')).results[0]
    assert (r.decision, r.status.code) == ("Indeterminate", "urn:oasis:names:tc:xacml:1.0:status:processing-error")
    assert "libvirt unreachable" in r.status.message


def test_json_values_xml_cannot_hold_still_give_an_xml_response(tmp_path):
    pdp = PDP.from_directory(DEFAULT_DIR)
    js = json.dumps({"Request": {"AccessSubject": {"Attribute": [
        {"AttributeId": "urn:oasis:names:tc:xacml:1.0:subject:subject-id", "Value": "bad\u0001name",
         "IncludeInResult": True},
        {"AttributeId": "urn:x:\u0002", "Issuer": "\u0003", "Value": 1, "IncludeInResult": True}]}}}).encode()
    xml = pdp.evaluate(parse_request(js)).to_xml()
    assert "bad\ufffdname".encode() in xml

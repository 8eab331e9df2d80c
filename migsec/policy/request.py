"""XACML requests in XML and in the JSON profile of XACML 3.0 (v1.0)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from migsec.errors import RequestSyntaxError
from migsec.policy import datatypes as T
from migsec.policy.parser import X, children, local
from migsec.policy.xmlsafe import parse_xml

CATEGORY_SHORT = {
    "AccessSubject": "urn:oasis:names:tc:xacml:1.0:subject-category:access-subject",
    "Action": "urn:oasis:names:tc:xacml:3.0:attribute-category:action",
    "Resource": "urn:oasis:names:tc:xacml:3.0:attribute-category:resource",
    "Environment": "urn:oasis:names:tc:xacml:3.0:attribute-category:environment",
    "RecipientSubject": "urn:oasis:names:tc:xacml:1.0:subject-category:recipient-subject",
    "IntermediarySubject": "urn:oasis:names:tc:xacml:1.0:subject-category:intermediary-subject",
    "Codebase": "urn:oasis:names:tc:xacml:1.0:subject-category:codebase",
    "RequestingMachine": "urn:oasis:names:tc:xacml:1.0:subject-category:requesting-machine",
}


@dataclass
class Attribute:
    attribute_id: str
    issuer: str | None
    include_in_result: bool
    values: list[tuple[str, Any]]  # (data type, value)


@dataclass
class Category:
    category: str
    attributes: list[Attribute] = field(default_factory=list)
    xml_id: str | None = None


@dataclass
class Request:
    categories: list[Category]
    return_policy_id_list: bool = False
    combined_decision: bool = False
    fmt: str = "xml"  # how the response should be written
    multi_requests: list[list[str]] = field(default_factory=list)  # MultiRequests: lists of Attributes ids

    def individual(self) -> list[list[Category]]:
        """Split per the multiple decision profile: MultiRequests, else one request per
        combination of repeated categories (document order), else the request itself."""
        if self.multi_requests:
            by_id = {c.xml_id: c for c in self.categories if c.xml_id}
            out = []
            for refs in self.multi_requests:
                missing = [r for r in refs if r not in by_id]
                if missing:
                    raise RequestSyntaxError(f"MultiRequests references unknown Attributes xml:id {missing[0]!r}")
                out.append([by_id[r] for r in refs])
            return out
        groups: dict[str, list[Category]] = {}
        for c in self.categories:
            groups.setdefault(c.category, []).append(c)
        combos: list[list[Category]] = [[]]
        for instances in groups.values():
            combos = [combo + [inst] for combo in combos for inst in instances]
        return combos

    @staticmethod
    def index(categories: list[Category]) -> dict[tuple[str, str, str], list[tuple[str | None, Any]]]:
        out: dict[tuple[str, str, str], list[tuple[str | None, Any]]] = {}
        for cat in categories:
            for a in cat.attributes:
                for dt, v in a.values:
                    out.setdefault((cat.category, a.attribute_id, dt), []).append((a.issuer, v))
        return out


def _bool_attr(el: etree._Element, name: str, source: str) -> bool:
    v = el.get(name, "false")
    if v not in ("true", "false", "1", "0"):
        raise RequestSyntaxError(f"{source}:{el.sourceline}: <{local(el)}> {name} must be a boolean, not {v!r}")
    return v in ("true", "1")


def parse_request_xml(data: bytes, source: str = "<request>") -> Request:
    """Parse an XACML 3.0 XML Request; raise RequestSyntaxError naming the bad element."""
    root = parse_xml(data, source, RequestSyntaxError)
    if root.tag != X + "Request":
        raise RequestSyntaxError(f"{source}: expected an XACML 3.0 <Request>, got {root.tag}")

    def fail(el: etree._Element, msg: str) -> RequestSyntaxError:
        return RequestSyntaxError(f"{source}:{el.sourceline}: <{local(el)}>: {msg}")

    cats, multi = [], []
    for el in children(root):
        name = local(el)
        if name == "Attributes":
            cat = el.get("Category")
            if not cat:
                raise fail(el, "missing Category")
            c = Category(cat, xml_id=el.get("{http://www.w3.org/XML/1998/namespace}id"))
            for a in children(el):
                if local(a) == "Content":
                    continue  # only AttributeSelector (XPath) reads it, which is not supported
                if local(a) != "Attribute":
                    raise fail(a, "unexpected element in Attributes")
                aid = a.get("AttributeId")
                if not aid:
                    raise fail(a, "missing AttributeId")
                values = []
                for v in children(a):
                    if local(v) != "AttributeValue":
                        raise fail(v, "unexpected element in Attribute")
                    dt = v.get("DataType")
                    if not dt:
                        raise fail(v, "missing DataType")
                    dt = T.canonical(dt)
                    if dt == T.XPATHEXPRESSION:  # kept for IncludeInResult; no policy can use one
                        cat = v.get("XPathCategory")
                        if not cat:
                            raise fail(v, "an xpathExpression value needs an XPathCategory")
                        values.append((dt, T.XPathExpression(v.text or "", cat)))
                        continue
                    try:
                        values.append((dt, T.parse_value(dt, v.text or "")))
                    except T.ValueSyntaxError as exc:
                        raise fail(v, str(exc)) from exc
                c.attributes.append(Attribute(aid, a.get("Issuer"), _bool_attr(a, "IncludeInResult", source), values))
            cats.append(c)
        elif name in ("RequestDefaults",):
            continue
        elif name == "MultiRequests":
            for ref in children(el):
                if local(ref) != "RequestReference":
                    raise fail(ref, "expected RequestReference")
                ids = [a.get("ReferenceId") for a in children(ref) if local(a) == "AttributesReference"]
                if not ids or not all(ids):
                    raise fail(ref, "a RequestReference needs AttributesReference elements with a ReferenceId")
                multi.append(ids)
        else:
            raise fail(el, "unexpected element in Request")
    request = Request(cats, _bool_attr(root, "ReturnPolicyIdList", source),
                      _bool_attr(root, "CombinedDecision", source), "xml", multi)
    request.individual()  # unknown references are a syntax error now, not at evaluation
    return request


def infer_datatype(value: Any) -> tuple[str, Any] | None:
    """The JSON profile's data type for a JSON value (boolean, integer, double, string), or
    None when it has none."""
    if isinstance(value, bool):  # before int: a bool is an int to Python
        return T.BOOLEAN, value
    if isinstance(value, int):
        return T.INTEGER, value
    if isinstance(value, float):
        return T.DOUBLE, value
    if isinstance(value, str):
        return T.STRING, value
    return None


def _json_value(dt: str | None, value: Any, where: str) -> tuple[str, Any]:
    if dt is None:  # the JSON profile infers the type from the JSON value
        inferred = infer_datatype(value)
        if inferred is not None:
            return inferred
        raise RequestSyntaxError(f"{where}: cannot infer a data type for {value!r}")
    dt = T.canonical(T.SHORT_NAMES.get(dt, dt))
    try:
        if isinstance(value, bool) and dt == T.BOOLEAN:
            return dt, value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and dt in (T.INTEGER, T.DOUBLE):
            if dt == T.INTEGER and isinstance(value, float):
                raise T.ValueSyntaxError(f"not an integer: {value!r}")
            return dt, float(value) if dt == T.DOUBLE else value
        if not isinstance(value, str):
            raise T.ValueSyntaxError(f"expected a string for {dt}, got {value!r}")
        return dt, T.parse_value(dt, value)
    except T.ValueSyntaxError as exc:
        raise RequestSyntaxError(f"{where}: {exc}") from exc


def parse_request_json(data: bytes, source: str = "<request>") -> Request:
    """Parse a request in the JSON profile of XACML 3.0."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestSyntaxError(f"{source}: not valid JSON: {exc}") from exc
    req = doc.get("Request") if isinstance(doc, dict) else None
    if not isinstance(req, dict):
        raise RequestSyntaxError(f"{source}: expected an object with a \"Request\" member")
    cats: list[Category] = []
    multi: list[list[str]] = []

    def category(obj: Any, cat_id: str, where: str) -> Category:
        if not isinstance(obj, dict):
            raise RequestSyntaxError(f"{where}: a category must be an object")
        c = Category(cat_id, xml_id=obj.get("Id"))
        attrs = obj.get("Attribute", [])
        for i, a in enumerate(attrs if isinstance(attrs, list) else [attrs]):
            w = f"{where}.Attribute[{i}]"
            if not isinstance(a, dict) or not isinstance(a.get("AttributeId"), str):
                raise RequestSyntaxError(f"{w}: missing AttributeId")
            if "Value" not in a:
                raise RequestSyntaxError(f"{w}: missing Value")
            raw = a["Value"] if isinstance(a["Value"], list) else [a["Value"]]
            values = [_json_value(a.get("DataType"), v, w) for v in raw]
            c.attributes.append(Attribute(a["AttributeId"], a.get("Issuer"), bool(a.get("IncludeInResult", False)), values))
        return c

    for key, value in req.items():
        if key in CATEGORY_SHORT:
            for i, obj in enumerate(value if isinstance(value, list) else [value]):
                cats.append(category(obj, CATEGORY_SHORT[key], f"{source}: Request.{key}[{i}]"))
        elif key == "Category":
            for i, obj in enumerate(value if isinstance(value, list) else [value]):
                cid = obj.get("CategoryId") if isinstance(obj, dict) else None
                if not isinstance(cid, str):
                    raise RequestSyntaxError(f"{source}: Request.Category[{i}]: missing CategoryId")
                cats.append(category(obj, CATEGORY_SHORT.get(cid, cid), f"{source}: Request.Category[{i}]"))
        elif key in ("ReturnPolicyIdList", "CombinedDecision", "XPathVersion"):
            continue
        elif key == "MultiRequests":
            refs = value.get("RequestReference") if isinstance(value, dict) else None
            if not isinstance(refs, list):
                raise RequestSyntaxError(f"{source}: Request.MultiRequests needs a RequestReference array")
            for i, ref in enumerate(refs):
                ids = ref.get("ReferenceId") if isinstance(ref, dict) else None
                if not isinstance(ids, list) or not ids or not all(isinstance(x, str) for x in ids):
                    raise RequestSyntaxError(f"{source}: Request.MultiRequests.RequestReference[{i}] needs ReferenceId strings")
                multi.append(ids)
        else:
            raise RequestSyntaxError(f"{source}: unknown member Request.{key}")
    request = Request(cats, bool(req.get("ReturnPolicyIdList", False)), bool(req.get("CombinedDecision", False)),
                      "json", multi)
    request.individual()
    return request


def parse_request(data: bytes, source: str = "<request>") -> Request:
    """XML or JSON, by the first non-blank character."""
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    return parse_request_json(data, source) if head == b"{" else parse_request_xml(data, source)

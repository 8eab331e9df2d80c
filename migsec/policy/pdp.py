"""The policy decision point: a loaded PolicyStore evaluated against requests."""
from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lxml import etree

from migsec.errors import PolicyError, PolicyReferenceError
from migsec.policy import datatypes as T
from migsec.policy import model as M
from migsec.policy.combining import only_one_applicable
from migsec.policy.loader import load_policy_directory
from migsec.policy.parser import NS, PolicyStore, load_policies
from migsec.policy.request import Category, Request

ENV = "urn:oasis:names:tc:xacml:3.0:attribute-category:environment"
CURRENT = "urn:oasis:names:tc:xacml:1.0:environment:current-"
_PUBLIC = {M.IND_D: "Indeterminate", M.IND_P: "Indeterminate", M.IND_DP: "Indeterminate"}


@dataclass
class ResultOut:
    """One Result of a Response, with the request attributes marked IncludeInResult."""

    decision: str  # Permit | Deny | NotApplicable | Indeterminate
    status: M.Status
    obligations: list[M.Obligation]
    advice: list[M.Obligation]
    attributes: list[Category] = field(default_factory=list)
    policy_ids: list[tuple[str, str, str]] = field(default_factory=list)
    extended: str = ""  # the extended Indeterminate kind, for diagnostics


@dataclass
class Response:
    results: list[ResultOut]
    fmt: str = "xml"

    def to_xml(self) -> bytes:
        return response_xml(self)

    def to_json(self) -> bytes:
        return response_json(self)

    def serialize(self) -> bytes:
        return self.to_json() if self.fmt == "json" else self.to_xml()


class PDP:
    """Evaluate requests against one root policy. ``clock`` supplies current-time when absent."""

    def __init__(self, store: PolicyStore, clock: Callable[[], _dt.datetime] | None = None,
                 extra_roots: list[M.Policy] | None = None,
                 attribute_provider: M.AttributeProvider | None = None) -> None:
        """``attribute_provider(category, attribute_id, data_type) -> [(issuer, value)]`` is asked
        for attributes a request lacks (a PIP); it may raise, which makes them Indeterminate."""
        self.store = store
        self.attribute_provider = attribute_provider
        self.clock = clock or (lambda: _dt.datetime.now(_dt.timezone.utc))
        # several initial policies: the one whose target applies is used, two applicable is an error
        self.roots = [store.root, *(extra_roots or [])]

    @classmethod
    def from_files(cls, paths: list[str | Path], roots: int = 1, **kw: Any) -> "PDP":
        """The first ``roots`` files are initial (root) policies; the rest are for references."""
        paths = list(paths)
        store = load_policies(paths)
        extra = [store.by_file[str(Path(p))] for p in paths[1:roots]]
        return cls(store, extra_roots=extra, **kw)

    @classmethod
    def from_directory(cls, directory: str | Path, **kw: Any) -> "PDP":
        """Every ``*.xml`` in ``directory`` (``migsec.policy.loader.load_policy_directory``: the
        root is the one policy nobody references, and every policy must be reachable from it)."""
        return cls(load_policy_directory(directory), **kw)

    def evaluate(self, request: Request) -> Response:
        """One Result per individual request (multiple decision profile), in order."""
        results = [self._evaluate_one(request, cats) for cats in request.individual()]
        if request.combined_decision and len(results) > 1:
            results = [_combine_results(results)]
        return Response(results, request.fmt)

    def _evaluate_one(self, request: Request, categories: list[Category]) -> ResultOut:
        index = Request.index(categories)
        now = None
        for name, (dt, _) in _NOW_TYPES.items():
            key = (ENV, CURRENT + name, dt)
            if key not in index:  # §10.2.5: the PDP supplies the current time, one instant per request
                now = now or T.now_values(self.clock())
                index[key] = [(None, now[name][1])]
        ctx = M.Context(index, self.attribute_provider)
        result = self.roots[0].evaluate(ctx) if len(self.roots) == 1 else only_one_applicable(self.roots, ctx)
        decision = _PUBLIC.get(result.decision, result.decision)
        decided = decision in (M.PERMIT, M.DENY)
        included = [Category(c.category, [a for a in c.attributes if a.include_in_result], c.xml_id)
                    for c in categories]
        return ResultOut(decision, result.status, result.obligations if decided else [],
                         result.advice if decided else [], [c for c in included if c.attributes],
                         list(dict.fromkeys(ctx.applicable)) if request.return_policy_id_list else [], result.decision)


_NOW_TYPES = {name: (dt, None) for name, (dt, _) in T.now_values(_dt.datetime(2000, 1, 1)).items()}


def _combine_results(results: list[ResultOut]) -> ResultOut:
    """CombinedDecision: one decision if all agree and carry no obligations/advice, else Indeterminate."""
    first = results[0]
    if all(r.decision == first.decision and not r.obligations and not r.advice for r in results):
        return ResultOut(first.decision, first.status, [], [])
    return ResultOut("Indeterminate", M.Status(M.PROCESSING, "individual decisions differ or carry obligations"), [], [])


# --- serialisation ------------------------------------------------------------------------------------
_XML_BAD = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(dt: str, value: Any) -> str:
    # a JSON request may carry characters XML cannot hold; the XML response shows U+FFFD instead
    return _XML_BAD.sub("\ufffd", T.format_value(dt, value))


def response_xml(resp: Response) -> bytes:
    root = etree.Element("{%s}Response" % NS, nsmap={None: NS})
    for r in resp.results:
        res = etree.SubElement(root, "{%s}Result" % NS)
        etree.SubElement(res, "{%s}Decision" % NS).text = r.decision
        st = etree.SubElement(res, "{%s}Status" % NS)
        etree.SubElement(st, "{%s}StatusCode" % NS, Value=r.status.code)
        if r.status.message:
            etree.SubElement(st, "{%s}StatusMessage" % NS).text = _XML_BAD.sub("\ufffd", r.status.message)
        if r.status.missing:
            detail = etree.SubElement(st, "{%s}StatusDetail" % NS)
            for m in r.status.missing:
                md = etree.SubElement(detail, "{%s}MissingAttributeDetail" % NS,
                                      {k: v for k, v in (("Category", m.category), ("AttributeId", m.attribute_id),
                                                         ("DataType", m.datatype), ("Issuer", m.issuer)) if v})
        for tag, items, id_attr in (("Obligations", r.obligations, "ObligationId"), ("AssociatedAdvice", r.advice, "AdviceId")):
            if not items:
                continue
            box = etree.SubElement(res, "{%s}%s" % (NS, tag))
            for o in items:
                oel = etree.SubElement(box, "{%s}%s" % (NS, "Obligation" if tag == "Obligations" else "Advice"), {id_attr: o.id})
                for a in o.assignments:
                    attrs = {"AttributeId": a.attribute_id, "DataType": a.datatype}
                    if a.category:
                        attrs["Category"] = a.category
                    if a.issuer:
                        attrs["Issuer"] = a.issuer
                    etree.SubElement(oel, "{%s}AttributeAssignment" % NS, attrs).text = _text(a.datatype, a.value)
        for c in r.attributes:
            cel = etree.SubElement(res, "{%s}Attributes" % NS, Category=_XML_BAD.sub("\ufffd", c.category))
            for attr in c.attributes:
                attrs = {"AttributeId": _XML_BAD.sub("\ufffd", attr.attribute_id), "IncludeInResult": "true"}
                if attr.issuer:
                    attrs["Issuer"] = _XML_BAD.sub("\ufffd", attr.issuer)
                ael = etree.SubElement(cel, "{%s}Attribute" % NS, attrs)
                for dt, v in attr.values:
                    vel = etree.SubElement(ael, "{%s}AttributeValue" % NS, DataType=dt)
                    vel.text = _text(dt, v)
                    if isinstance(v, T.XPathExpression):
                        vel.set("XPathCategory", v.xpath_category)
        if r.policy_ids:
            pl = etree.SubElement(res, "{%s}PolicyIdentifierList" % NS)
            for kind, pid, version in r.policy_ids:
                etree.SubElement(pl, "{%s}%sIdReference" % (NS, kind), Version=version).text = pid
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def _json_attr_value(dt: str, v: Any) -> Any:
    if dt in (T.BOOLEAN, T.INTEGER) or (dt == T.DOUBLE and T.format_double(v) == repr(v)):
        return v
    return _text(dt, v)


def _json_type(dt: str) -> str:
    known = T.DATATYPES.get(dt)
    return known.short if known else dt


def response_json(resp: Response) -> bytes:
    results = []
    for r in resp.results:
        out: dict[str, Any] = {"Decision": r.decision, "Status": {"StatusCode": {"Value": r.status.code}}}
        if r.status.message:
            out["Status"]["StatusMessage"] = r.status.message
        if r.status.missing:
            out["Status"]["StatusDetail"] = {"MissingAttributeDetail": [
                {k: v for k, v in (("Category", m.category), ("AttributeId", m.attribute_id),
                                   ("DataType", m.datatype), ("Issuer", m.issuer)) if v} for m in r.status.missing]}
        for key, items in (("Obligations", r.obligations), ("AssociatedAdvice", r.advice)):
            if items:
                out[key] = [{"Id": o.id, "AttributeAssignment": [
                    {k: v for k, v in (("AttributeId", a.attribute_id), ("Value", _json_attr_value(a.datatype, a.value)),
                                       ("DataType", _json_type(a.datatype)), ("Category", a.category),
                                       ("Issuer", a.issuer)) if v is not None} for a in o.assignments]} for o in items]
        if r.attributes:
            out["Category"] = [{"CategoryId": c.category, "Attribute": [
                {k: v for k, v in (("AttributeId", a.attribute_id), ("Issuer", a.issuer),
                                   ("Value", [_json_attr_value(dt, v) for dt, v in a.values]),
                                   ("DataType", _json_type(a.values[0][0]) if a.values else None)) if v is not None}
                for a in c.attributes]} for c in r.attributes]
        if r.policy_ids:
            out["PolicyIdentifierList"] = {
                "PolicyIdReference": [{"Id": i, "Version": v} for k, i, v in r.policy_ids if k == "Policy"],
                "PolicySetIdReference": [{"Id": i, "Version": v} for k, i, v in r.policy_ids if k == "PolicySet"]}
        results.append(out)
    return json.dumps({"Response": results}, indent=2).encode()

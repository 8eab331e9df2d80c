"""Discover the cases of the XACML conformance suite and compare responses the way AuthzForce does.

Comparison: Decision and top-level StatusCode exactly (no Status = ok); Obligations, advice,
returned Attributes and PolicyIdentifierList as unordered multisets, values compared by data type
(so ``27.50`` equals ``27.5``). StatusMessage and StatusDetail are ignored.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from migsec.errors import PolicyError, RequestSyntaxError
from migsec.policy import datatypes as T
from migsec.policy.parser import X
from migsec.policy.pdp import PDP
from migsec.policy.request import parse_request

REPO = Path(__file__).resolve().parents[2]
SUITE = Path(os.environ.get("MIGSEC_XACML_SUITE") or REPO.parent / "shared" / "xacml-conformance")
PER_FOLDER = ("xacml-3.0-from-2.0-ct/mandatory", "xacml-3.0-from-2.0-ct/optional/xml",
              "xacml-3.0-from-2.0-ct/optional/xml+json")
FLAT = ("xacml-3.0-from-2.0-ct/unsupported", "att-xacml3.0-deprecated", "authzforce-recovered")
OTHERS = "authzforce-others"


@dataclass
class Case:
    folder: str
    id: str
    kind: str  # evaluate | policy-load-error | request-syntax-error
    policies: list[Path]  # root first (several roots only for IID029/030)
    refs: list[Path] = field(default_factory=list)
    request: Path | None = None
    response: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.folder}/{self.id}"


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def discover(suite: Path = SUITE) -> list[Case]:
    cases: list[Case] = []
    for folder in PER_FOLDER:
        for d in sorted(p for p in (suite / folder).iterdir() if p.is_dir()):
            if (d / "Policies").is_dir():
                root = d / "Policies" / "Policy.xml"
                refs = sorted(p for p in (d / "Policies").glob("*.xml") if p != root)
            else:
                root, refs = d / "Policy.xml", []
            if (d / "Request.xml").exists():
                cases.append(Case(folder, d.name, "evaluate", [root], refs, d / "Request.xml", d / "Response.xml"))
            else:
                cases.append(Case(folder, d.name, "policy-load-error", [root], refs))
    for folder in FLAT:
        base = suite / folder
        files = sorted(base.rglob("*Request.xml*"))
        for req in files:
            cid = req.name.split("Request.xml")[0]
            where = req.parent
            roots = sorted(where.glob(f"{cid}Policy[0-9].xml")) or [where / f"{cid}Policy.xml"]
            if req.name.endswith(".ignore"):
                cases.append(Case(folder, cid, "policy-load-error", roots))
            elif (where / f"{cid}Policy.xml.ignore").exists():
                cases.append(Case(folder, cid, "request-syntax-error", [], request=req))
            else:
                cases.append(Case(folder, cid, "evaluate", roots, [], req, where / f"{cid}Response.xml"))
    for d in sorted(p for p in (suite / OTHERS).iterdir() if p.is_dir()):
        if (d / "policies").is_dir():
            root = d / "policies" / "policy.xml"
            refs = sorted(p for p in (d / "policies").glob("*.xml") if p != root)
        else:
            root, refs = d / "policy.xml", []
        if (d / "request.xml").exists():
            cases.append(Case(OTHERS, d.name, "evaluate", [root], refs, d / "request.xml", d / "response.xml"))
        else:
            cases.append(Case(OTHERS, d.name, "policy-load-error", [root], refs))
    return cases


# --- running one case -------------------------------------------------------------------------------
def _value_key(dt: str, text: str) -> Any:
    try:
        v = T.parse_value(dt, text or "")
    except T.ValueSyntaxError:
        return ("unparsed", text)
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return v


def _assignments(el: etree._Element) -> Counter:
    return Counter((a.get("AttributeId"), T.canonical(a.get("DataType")), a.get("Category"), a.get("Issuer"),
                    _value_key(T.canonical(a.get("DataType")), a.text)) for a in el.iter(X + "AttributeAssignment"))


def _frozen(c: Counter) -> frozenset:
    return frozenset(c.items())


def result_summary(res: etree._Element) -> dict[str, Any]:
    code = res.find(f"{X}Status/{X}StatusCode")
    out: dict[str, Any] = {
        "decision": (res.findtext(X + "Decision") or "").strip(),
        "status": code.get("Value") if code is not None else "urn:oasis:names:tc:xacml:1.0:status:ok",
        "obligations": Counter((o.get("ObligationId"), _frozen(_assignments(o))) for o in res.iter(X + "Obligation")),
        "advice": Counter((o.get("AdviceId"), _frozen(_assignments(o))) for o in res.iter(X + "Advice")),
        "attributes": Counter(),
    }
    for cat in res.findall(X + "Attributes"):
        for a in cat.findall(X + "Attribute"):
            vals = Counter((T.canonical(v.get("DataType")), _value_key(T.canonical(v.get("DataType")), v.text))
                           for v in a.findall(X + "AttributeValue"))
            out["attributes"][(cat.get("Category"), a.get("AttributeId"), a.get("Issuer"), _frozen(vals))] += 1
    pil = res.find(X + "PolicyIdentifierList")
    if pil is not None:
        out["policy_ids"] = Counter((etree.QName(r).localname, (r.text or "").strip(), r.get("Version"))
                                    for r in pil if isinstance(r.tag, str))
    return out


def response_summary(data: bytes) -> list[dict[str, Any]]:
    # collect_ids=False: IIIE303Response.xml repeats an xml:id across Results (a bug in that file)
    root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True, collect_ids=False))
    return [result_summary(r) for r in root.findall(X + "Result")]


def _provider(case: Case):
    """IIA002's AttributeProvider.xml (AuthzForce's test PIP): fixed attributes, asked when missing."""
    if not case.policies or not (case.policies[0].parent / "AttributeProvider.xml").exists():
        return None
    root = etree.fromstring((case.policies[0].parent / "AttributeProvider.xml").read_bytes())
    table: dict[tuple[str, str, str], list] = {}
    for cat in root.iter(X + "Attributes"):
        for a in cat.iter(X + "Attribute"):
            for v in a.iter(X + "AttributeValue"):
                dt = v.get("DataType")
                table.setdefault((cat.get("Category"), a.get("AttributeId"), dt), []).append(
                    (a.get("Issuer"), T.parse_value(dt, v.text or "")))
    return lambda category, attribute_id, datatype: table.get((category, attribute_id, datatype), [])


def run_case(case: Case) -> str | None:
    """None when the PDP behaves as the case expects, else a one-line reason."""
    try:
        if case.kind == "request-syntax-error":
            try:
                parse_request(case.request.read_bytes(), str(case.request))
            except RequestSyntaxError:
                return None
            return "request accepted, expected a syntax error"
        try:
            pdp = PDP.from_files([*case.policies, *case.refs], roots=len(case.policies),
                                 attribute_provider=_provider(case))
        except PolicyError as exc:
            return None if case.kind == "policy-load-error" else f"load failed: {exc}"
        if case.kind == "policy-load-error":
            return "policy loaded, expected a load error"
        try:
            request = parse_request(case.request.read_bytes(), str(case.request))
        except RequestSyntaxError as exc:
            return f"request refused: {exc}"
        got = response_summary(pdp.evaluate(request).to_xml())
        want = response_summary(case.response.read_bytes())
        if len(got) != len(want):
            return f"{len(got)} results, expected {len(want)}"
        for g, w in zip(got, want):
            for key in w:
                if g.get(key) != w[key]:
                    return f"{key}: got {_short(g.get(key))}, expected {_short(w[key])}"
        return None
    except Exception as exc:  # a crash is a failure of that case, reported with the others
        return f"crash: {type(exc).__name__}: {exc}"


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) < 300 else s[:300] + "..."


def load_unsupported(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        if not reason.strip():
            raise ValueError(f"{path}: {name} has no reason")
        out[name] = reason.strip()
    return out

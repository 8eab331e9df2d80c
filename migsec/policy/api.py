"""``authorize()``: the daemon's one call into the PDP, with plain dicts in and out."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Mapping

from migsec.errors import PolicyError, RequestSyntaxError
from migsec.policy import attributes as A
from migsec.policy import datatypes as T
from migsec.policy.model import Obligation as _Obl
from migsec.policy.pdp import PDP
from migsec.policy.request import Attribute, Category, Request, infer_datatype


@dataclass(frozen=True)
class Obligation:
    """An obligation or advice: id and its assignments (attribute id -> value, a list if repeated)."""

    id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Decision:
    decision: str  # "Permit" | "Deny" | "NotApplicable" | "Indeterminate"
    obligations: list[Obligation] = field(default_factory=list)
    advice: list[Obligation] = field(default_factory=list)
    status: str = "urn:oasis:names:tc:xacml:1.0:status:ok"
    status_message: str = ""
    missing: list[str] = field(default_factory=list)  # attribute ids reported missing

    @property
    def permitted(self) -> bool:
        return self.decision == "Permit"


def _infer(value: Any) -> tuple[str, Any]:
    inferred = infer_datatype(value)
    if inferred is not None:
        return inferred
    if isinstance(value, _dt.datetime):
        return T.DATETIME, _datetime(value)
    raise RequestSyntaxError(f"cannot map a {type(value).__name__} to an XACML data type")


def _datetime(value: _dt.datetime) -> T.DateTime:
    return T.DateTime(value, value.tzinfo is not None)


def _coerce(spec: A.AttributeSpec, value: Any) -> Any:
    dt = spec.datatype
    ok: type = {T.STRING: str, T.INTEGER: int, T.DATETIME: _dt.datetime}[dt]
    if not isinstance(value, ok) or (dt == T.INTEGER and isinstance(value, bool)):
        raise RequestSyntaxError(f"attribute {spec.short!r} must be {ok.__name__}, not {type(value).__name__}")
    return _datetime(value) if isinstance(value, _dt.datetime) else value


def _category(category: str, values: Mapping[str, Any]) -> Category:
    cat = Category(category)
    for key, value in values.items():
        spec = A.BY_SHORT.get((category, key)) or A.BY_ID.get((category, key))
        items = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        if spec is not None:
            if len(items) != 1 and not spec.multi:
                raise RequestSyntaxError(f"attribute {spec.short!r} takes one value, got {len(items)}")
            typed = [(spec.datatype, _coerce(spec, v)) for v in items]
            cat.attributes.append(Attribute(spec.id, None, False, typed))
        elif ":" in key:  # a full attribute id the operator's own policy uses
            cat.attributes.append(Attribute(key, None, False, [_infer(v) for v in items]))
        else:
            known = sorted(s.short for s in A.SPECS if s.category == category)
            raise RequestSyntaxError(f"unknown attribute {key!r} for {category.rsplit(':', 1)[-1]}; known: {', '.join(known)}")
    return cat


def build_request(*, subject: Mapping[str, Any], resource: Mapping[str, Any], action: str,
                  environment: Mapping[str, Any]) -> Request:
    if not isinstance(action, str) or not action:
        raise RequestSyntaxError("action must be a non-empty string such as 'migrate'")
    cats = [_category(A.SUBJECT, subject), _category(A.RESOURCE, resource),
            _category(A.ACTION, {"action-id": action}), _category(A.ENVIRONMENT, environment)]
    return Request(cats)


def _plain(o: _Obl) -> Obligation:
    attrs: dict[str, Any] = {}
    for a in o.assignments:
        v = a.value.value if isinstance(a.value, T.DateTime) else a.value
        if a.attribute_id in attrs:
            prev = attrs[a.attribute_id]
            attrs[a.attribute_id] = (prev if isinstance(prev, list) else [prev]) + [v]
        else:
            attrs[a.attribute_id] = v
    return Obligation(o.id, attrs)


def authorize(pdp: PDP, *, subject: Mapping[str, Any], resource: Mapping[str, Any], action: str,
              environment: Mapping[str, Any]) -> Decision:
    """Ask ``pdp`` whether ``subject`` may do ``action`` on ``resource``; see migsec.policy.attributes.

    Raises RequestSyntaxError for an unknown attribute or a value of the wrong type; every other
    outcome is a Decision, and only ``decision == "Permit"`` allows the migration.
    """
    if not isinstance(pdp, PDP):
        raise PolicyError("authorize() needs a migsec.policy.PDP")
    request = build_request(subject=subject, resource=resource, action=action, environment=environment)
    r = pdp.evaluate(request).results[0]
    return Decision(r.decision, [_plain(o) for o in r.obligations], [_plain(o) for o in r.advice],
                    r.status.code, r.status.message, [m.attribute_id for m in r.status.missing])

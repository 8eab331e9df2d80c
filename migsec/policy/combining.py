"""Rule- and policy-combining algorithms (XACML 3.0 Appendix C), including legacy 1.0/1.1 ones.

Children are evaluated lazily, in order, so the ordered-* variants are the same code as the
unordered ones (this PDP always evaluates in document order, which the spec allows).
Obligations and advice come from the children whose decision equals the combined decision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from migsec.policy.model import (
    DENY, IND_D, IND_DP, IND_P, INDETERMINATE, NA, PERMIT, STATUS_OK, Context, Indeterminate,
    Result, Status, processing_error,
)

R1 = "urn:oasis:names:tc:xacml:1.0:rule-combining-algorithm:"
R11 = "urn:oasis:names:tc:xacml:1.1:rule-combining-algorithm:"
R3 = "urn:oasis:names:tc:xacml:3.0:rule-combining-algorithm:"
P1 = "urn:oasis:names:tc:xacml:1.0:policy-combining-algorithm:"
P11 = "urn:oasis:names:tc:xacml:1.1:policy-combining-algorithm:"
P3 = "urn:oasis:names:tc:xacml:3.0:policy-combining-algorithm:"


def _merge(decision: str, results: Sequence[Result]) -> Result:
    out = Result(decision)
    for r in results:
        if r.decision == decision:
            out.obligations.extend(r.obligations)
            out.advice.extend(r.advice)
    return out


def _first_status(results: Sequence[Result], kinds: tuple[str, ...] = INDETERMINATE) -> Status:
    for r in results:
        if r.decision in kinds:
            return r.status
    return STATUS_OK


def _overrides(children: Sequence[Any], ctx: Context, win: str, lose: str) -> Result:
    """deny-overrides (win=Deny) and permit-overrides (win=Permit), §C.2/C.4."""
    ind_win, ind_lose = (IND_D, IND_P) if win == DENY else (IND_P, IND_D)
    seen: list[Result] = []
    for child in children:
        r = child.evaluate(ctx)
        if r.decision == win:
            return r
        seen.append(r)
    kinds = {r.decision for r in seen}
    if IND_DP in kinds:
        return Result(IND_DP, _first_status(seen))
    if ind_win in kinds and (ind_lose in kinds or lose in kinds):
        return Result(IND_DP, _first_status(seen))
    if ind_win in kinds:
        return Result(ind_win, _first_status(seen))
    if lose in kinds:
        return _merge(lose, seen)
    if ind_lose in kinds:
        return Result(ind_lose, _first_status(seen))
    return Result(NA)


def deny_overrides(children: Sequence[Any], ctx: Context) -> Result:
    return _overrides(children, ctx, DENY, PERMIT)


def permit_overrides(children: Sequence[Any], ctx: Context) -> Result:
    return _overrides(children, ctx, PERMIT, DENY)


def _unless(children: Sequence[Any], ctx: Context, win: str, default: str) -> Result:
    seen = []
    for child in children:
        r = child.evaluate(ctx)
        if r.decision == win:
            return r
        seen.append(r)
    return _merge(default, seen)


def deny_unless_permit(children: Sequence[Any], ctx: Context) -> Result:
    return _unless(children, ctx, PERMIT, DENY)


def permit_unless_deny(children: Sequence[Any], ctx: Context) -> Result:
    return _unless(children, ctx, DENY, PERMIT)


def first_applicable(children: Sequence[Any], ctx: Context) -> Result:
    for child in children:
        r = child.evaluate(ctx)
        if r.decision != NA:
            return r
    return Result(NA)


def only_one_applicable(children: Sequence[Any], ctx: Context) -> Result:
    selected = None
    for child in children:
        try:
            applicable = child.is_applicable(ctx)
        except Indeterminate as exc:
            return Result(IND_DP, exc.status)
        if applicable:
            if selected is not None:
                return Result(IND_DP, processing_error("more than one policy is applicable").status)
            selected = child
    return selected.evaluate(ctx) if selected is not None else Result(NA)


def _legacy_rule_overrides(children: Sequence[Any], ctx: Context, win: str, lose: str) -> Result:
    """XACML 1.0 rule deny-/permit-overrides: an error in a rule of the winning effect counts."""
    seen: list[Result] = []
    potential = error = False
    for rule in children:
        r = rule.evaluate(ctx)
        if r.decision == win:
            return r
        seen.append(r)
        if r.decision in INDETERMINATE:
            if rule.effect == win:
                potential = True
            else:
                error = True
    ind = _first_status(seen)
    if potential:
        return Result(IND_DP, ind)
    if any(r.decision == lose for r in seen):
        return _merge(lose, seen)
    if error:
        return Result(IND_P if lose == PERMIT else IND_D, ind)
    return Result(NA)


def _legacy_policy_overrides(children: Sequence[Any], ctx: Context, win: str, lose: str) -> Result:
    seen: list[Result] = []
    for child in children:
        r = child.evaluate(ctx)
        if r.decision == win:
            return r
        if r.decision in INDETERMINATE and win == DENY:
            return Result(DENY)  # XACML 1.0: an error in deny-overrides is a Deny
        seen.append(r)
    if any(r.decision == lose for r in seen):
        return _merge(lose, seen)
    if any(r.decision in INDETERMINATE for r in seen):
        return Result(IND_DP, _first_status(seen))
    return Result(NA)


@dataclass(frozen=True)
class Algorithm:
    id: str
    combine: Callable[[Sequence[Any], Context], Result]
    for_rules: bool


def _alg(i: str, f: Callable[[Sequence[Any], Context], Result], rules: bool) -> Algorithm:
    return Algorithm(i, f, rules)


ALGORITHMS: dict[str, Algorithm] = {}
for _ns_r, _ns_p in ((R3, P3),):
    for _name, _f in (("deny-overrides", deny_overrides), ("permit-overrides", permit_overrides),
                      ("ordered-deny-overrides", deny_overrides), ("ordered-permit-overrides", permit_overrides),
                      ("deny-unless-permit", deny_unless_permit), ("permit-unless-deny", permit_unless_deny)):
        ALGORITHMS[_ns_r + _name] = _alg(_ns_r + _name, _f, True)
        ALGORITHMS[_ns_p + _name] = _alg(_ns_p + _name, _f, False)
ALGORITHMS[R1 + "first-applicable"] = _alg(R1 + "first-applicable", first_applicable, True)
ALGORITHMS[P1 + "first-applicable"] = _alg(P1 + "first-applicable", first_applicable, False)
ALGORITHMS[P1 + "only-one-applicable"] = _alg(P1 + "only-one-applicable", only_one_applicable, False)
# legacy (deprecated in 3.0, still to be supported)
for _ns, _ord in ((R1, ""), (R11, "ordered-")):
    ALGORITHMS[_ns + _ord + "deny-overrides"] = _alg(_ns + _ord + "deny-overrides", lambda c, x: _legacy_rule_overrides(c, x, DENY, PERMIT), True)
    ALGORITHMS[_ns + _ord + "permit-overrides"] = _alg(_ns + _ord + "permit-overrides", lambda c, x: _legacy_rule_overrides(c, x, PERMIT, DENY), True)
for _ns, _ord in ((P1, ""), (P11, "ordered-")):
    ALGORITHMS[_ns + _ord + "deny-overrides"] = _alg(_ns + _ord + "deny-overrides", lambda c, x: _legacy_policy_overrides(c, x, DENY, PERMIT), False)
    ALGORITHMS[_ns + _ord + "permit-overrides"] = _alg(_ns + _ord + "permit-overrides", lambda c, x: _legacy_policy_overrides(c, x, PERMIT, DENY), False)

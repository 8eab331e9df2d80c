"""Combining algorithms on stub children with fixed results (XACML 3.0 Appendix C tables)."""
from __future__ import annotations

import pytest

from migsec.policy import combining as C
from migsec.policy.model import DENY, IND_D, IND_DP, IND_P, NA, PERMIT, Context, Indeterminate, Obligation, Result, Status


class Child:
    """A rule or policy whose evaluation result is fixed; records whether it was evaluated."""

    def __init__(self, decision: str, effect: str | None = None, tag: str = "", applicable: object = True) -> None:
        self.decision, self.effect, self.tag, self.applicable = decision, effect, tag, applicable
        self.evaluated = False

    def evaluate(self, ctx: Context) -> Result:
        self.evaluated = True
        r = Result(self.decision, Status("urn:x:" + self.tag) if self.decision.startswith("Ind") else Status())
        if self.tag and self.decision in (PERMIT, DENY):
            r.obligations.append(Obligation(self.tag, ()))
        return r

    def is_applicable(self, ctx: Context) -> bool:
        if isinstance(self.applicable, Indeterminate):
            raise self.applicable
        return bool(self.applicable)


def run(alg: str, *decisions: str) -> str:
    return C.ALGORITHMS[alg].combine([Child(d) for d in decisions], Context({})).decision


DO = C.R3 + "deny-overrides"
PO = C.P3 + "permit-overrides"


@pytest.mark.parametrize("decisions, expected", [
    ((), NA), ((NA, NA), NA), ((PERMIT, NA), PERMIT), ((PERMIT, DENY), DENY), ((IND_D, PERMIT), IND_DP),
    ((IND_D, NA), IND_D), ((IND_P, NA), IND_P), ((IND_P, PERMIT), PERMIT), ((IND_DP, PERMIT), IND_DP),
    ((IND_D, IND_P), IND_DP), ((IND_DP, DENY), DENY),
])
def test_deny_overrides(decisions, expected):
    assert run(DO, *decisions) == expected


@pytest.mark.parametrize("decisions, expected", [
    ((DENY, PERMIT), PERMIT), ((IND_P, DENY), IND_DP), ((IND_D, DENY), DENY), ((IND_P, NA), IND_P), ((IND_D,), IND_D),
])
def test_permit_overrides(decisions, expected):
    assert run(PO, *decisions) == expected


@pytest.mark.parametrize("alg, decisions, expected", [
    (C.R3 + "deny-unless-permit", (IND_DP, NA), DENY), (C.R3 + "deny-unless-permit", (DENY, PERMIT), PERMIT),
    (C.R3 + "permit-unless-deny", (IND_DP, NA), PERMIT), (C.R3 + "permit-unless-deny", (PERMIT, DENY), DENY),
    (C.R1 + "first-applicable", (NA, IND_P, PERMIT), IND_P), (C.R1 + "first-applicable", (NA, DENY, PERMIT), DENY),
    (C.P1 + "deny-overrides", (PERMIT, IND_DP), DENY),  # legacy: an error counts as Deny
    (C.P1 + "permit-overrides", (DENY, IND_DP), DENY), (C.P1 + "permit-overrides", (IND_DP, NA), IND_DP),
])
def test_other_algorithms(alg, decisions, expected):
    assert run(alg, *decisions) == expected


def test_legacy_rule_deny_overrides_looks_at_the_effect():
    alg = C.ALGORITHMS[C.R1 + "deny-overrides"]
    # an Indeterminate Deny rule may have denied: not a Permit
    assert alg.combine([Child(IND_D, DENY), Child(PERMIT, PERMIT)], Context({})).decision.startswith("Ind")
    # an Indeterminate Permit rule does not stop another rule's Permit
    assert alg.combine([Child(IND_P, PERMIT), Child(PERMIT, PERMIT)], Context({})).decision == PERMIT


def test_evaluation_stops_at_the_deciding_child():
    children = [Child(PERMIT), Child(DENY), Child(PERMIT)]
    C.ALGORITHMS[DO].combine(children, Context({}))
    assert [c.evaluated for c in children] == [True, True, False]


def test_obligations_come_from_children_with_the_final_decision():
    r = C.ALGORITHMS[DO].combine([Child(PERMIT, tag="a"), Child(NA), Child(PERMIT, tag="b")], Context({}))
    assert r.decision == PERMIT and [o.id for o in r.obligations] == ["a", "b"]
    r = C.ALGORITHMS[C.R3 + "deny-unless-permit"].combine([Child(DENY, tag="d1"), Child(DENY, tag="d2")], Context({}))
    assert r.decision == DENY and [o.id for o in r.obligations] == ["d1", "d2"]


def test_indeterminate_keeps_the_first_status():
    r = C.ALGORITHMS[DO].combine([Child(NA), Child(IND_D, tag="first"), Child(IND_D, tag="second")], Context({}))
    assert r.status.code == "urn:x:first"


def test_only_one_applicable():
    oo = C.ALGORITHMS[C.P1 + "only-one-applicable"]
    assert oo.combine([Child(PERMIT, applicable=False), Child(DENY)], Context({})).decision == DENY
    assert oo.combine([Child(PERMIT), Child(DENY)], Context({})).decision == IND_DP
    err = Indeterminate(Status("urn:x:t"))
    assert oo.combine([Child(PERMIT, applicable=err)], Context({})).decision == IND_DP
    assert oo.combine([Child(PERMIT, applicable=False)], Context({})).decision == NA

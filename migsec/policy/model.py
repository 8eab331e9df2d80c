"""The policy tree and its evaluation (XACML 3.0 core §7).

Parsed once by ``parser``; evaluated per request against a ``Context``. Expression errors are
raised as ``Indeterminate`` and turned into extended Indeterminate results (§7.11-7.14) at rule,
policy and policy-set level.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from migsec.policy import datatypes as T
from migsec.policy.functions import EvalError, Function, Type

STATUS = "urn:oasis:names:tc:xacml:1.0:status:"
OK, MISSING, SYNTAX, PROCESSING = STATUS + "ok", STATUS + "missing-attribute", STATUS + "syntax-error", STATUS + "processing-error"

PERMIT, DENY, NA = "Permit", "Deny", "NotApplicable"
IND_D, IND_P, IND_DP = "Indeterminate{D}", "Indeterminate{P}", "Indeterminate{DP}"
INDETERMINATE = (IND_D, IND_P, IND_DP)


@dataclass(frozen=True)
class MissingAttribute:
    category: str
    attribute_id: str
    datatype: str
    issuer: str | None


@dataclass(frozen=True)
class Status:
    code: str = OK
    message: str = ""
    missing: tuple[MissingAttribute, ...] = ()


STATUS_OK = Status()


class Indeterminate(Exception):
    """An expression could not be evaluated; carries the XACML status."""

    def __init__(self, status: Status) -> None:
        super().__init__(status.message)
        self.status = status


def processing_error(message: str) -> Indeterminate:
    return Indeterminate(Status(PROCESSING, message))


@dataclass(frozen=True)
class AttributeAssignment:
    attribute_id: str
    datatype: str
    value: Any
    category: str | None = None
    issuer: str | None = None


@dataclass(frozen=True)
class Obligation:
    """An obligation or advice instance in a result (id plus its assignments, in order)."""

    id: str
    assignments: tuple[AttributeAssignment, ...]


@dataclass
class Result:
    decision: str
    status: Status = STATUS_OK
    obligations: list[Obligation] = field(default_factory=list)
    advice: list[Obligation] = field(default_factory=list)


# (category, attribute id, data type) -> [(issuer, value)]; the PDP's attribute finder (a PIP)
AttributeProvider = Callable[[str, str, str], "list[tuple[str | None, Any]]"]


class Context:
    """One request as the evaluator sees it: attribute bags by (category, id, data type).

    An attribute the request lacks is asked of ``provider`` once (if there is one), so values
    that are costly to compute are only fetched when a policy needs them.
    """

    def __init__(self, attributes: dict[tuple[str, str, str], list[tuple[str | None, Any]]],
                 provider: AttributeProvider | None = None) -> None:
        self.attributes = attributes
        self.provider = provider
        self.variables: dict[int, Any] = {}
        # every Policy/PolicySet evaluated with a result other than NotApplicable (ReturnPolicyIdList),
        # as AuthzForce reports it: also those that did not decide the combined result
        self.applicable: list[tuple[str, str, str]] = []

    def bag(self, category: str, attribute_id: str, datatype: str, issuer: str | None) -> list[Any]:
        key = (category, attribute_id, datatype)
        found = self.attributes.get(key)
        if found is None:
            found = self.attributes[key] = self._provide(key)
        if issuer is None:
            return [v for _, v in found]
        return [v for iss, v in found if iss == issuer]

    def _provide(self, key: tuple[str, str, str]) -> list[tuple[str | None, Any]]:
        if self.provider is None:
            return []
        try:
            return list(self.provider(*key))
        except Exception as exc:  # a PIP failure is this attribute's Indeterminate, not a crash
            raise processing_error(f"attribute provider failed for {key[1]}: {type(exc).__name__}: {exc}") from exc


# --- expressions -------------------------------------------------------------------------------
class Expr:
    type: Type

    def evaluate(self, ctx: Context) -> Any:
        raise NotImplementedError


@dataclass
class Value(Expr):
    type: Type
    value: Any

    def evaluate(self, ctx: Context) -> Any:
        return self.value


@dataclass
class Designator(Expr):
    category: str
    attribute_id: str
    datatype: str
    issuer: str | None
    must_be_present: bool
    type: Type = ("", True)

    def __post_init__(self) -> None:
        self.type = (self.datatype, True)

    def evaluate(self, ctx: Context) -> Any:
        bag = ctx.bag(self.category, self.attribute_id, self.datatype, self.issuer)
        if not bag and self.must_be_present:
            missing = MissingAttribute(self.category, self.attribute_id, self.datatype, self.issuer)
            raise Indeterminate(Status(MISSING, f"missing attribute {self.attribute_id} in {self.category}", (missing,)))
        return bag


@dataclass
class FunctionRef(Expr):
    function: Function
    type: Type = ("function", False)

    def evaluate(self, ctx: Context) -> Any:
        return self.function


@dataclass
class VariableRef(Expr):
    variable_id: str
    definition: "VariableDefinition"
    type: Type = ("", False)

    def evaluate(self, ctx: Context) -> Any:
        key = id(self.definition)
        cached = ctx.variables.get(key, _UNSET)
        if cached is _UNSET:
            try:
                cached = self.definition.expression.evaluate(ctx)
            except Indeterminate as exc:
                cached = exc
            ctx.variables[key] = cached
        if isinstance(cached, Indeterminate):
            raise cached
        return cached


_UNSET = object()


@dataclass
class VariableDefinition:
    variable_id: str
    expression: Expr


def call(fn: Function, args: Sequence[Any]) -> Any:
    try:
        return fn.impl(*args)
    except EvalError as exc:
        inner = getattr(exc, "indeterminate", None)
        if inner is not None:  # an argument's own status (e.g. missing-attribute) is kept
            raise inner from exc
        raise processing_error(str(exc)) from exc
    except (ArithmeticError, ValueError) as exc:  # e.g. integer overflow into float
        raise processing_error(f"{fn.id}: {exc}") from exc


def call_inner(fn: Function, args: Sequence[Any]) -> Any:
    if fn.lazy:
        return call(fn, [(lambda v=v: v) for v in args])
    return call(fn, args)


@dataclass
class Apply(Expr):
    function: Function
    args: list[Expr]
    type: Type

    def evaluate(self, ctx: Context) -> Any:
        fn = self.function
        if fn.lazy:
            return call(fn, [_thunk(a, ctx) for a in self.args])
        if fn.higher_order:
            return _higher_order(fn.id.rsplit(":", 1)[-1], self.args[0].evaluate(ctx),
                                 [a.evaluate(ctx) for a in self.args[1:]], [a.type[1] for a in self.args[1:]])
        return call(fn, [a.evaluate(ctx) for a in self.args])


def _thunk(expr: Expr, ctx: Context) -> Callable[[], Any]:
    def run() -> Any:
        try:
            return expr.evaluate(ctx)
        except Indeterminate as exc:
            # lazy functions (and/or/n-of) see an EvalError; call() restores the original status
            err = EvalError(exc.status.message)
            err.indeterminate = exc  # type: ignore[attr-defined]
            raise err from exc

    return run


def _higher_order(name: str, fn: Function, args: list[Any], is_bag: list[bool]) -> Any:
    if name in ("any-of", "all-of", "map"):
        pos = is_bag.index(True)

        def at(v: Any) -> Any:
            return call_inner(fn, args[:pos] + [v] + args[pos + 1 :])

        if name == "map":
            return [at(v) for v in args[pos]]
        results = (at(v) for v in args[pos])
        return any(results) if name == "any-of" else all(results)
    first, second = args
    if name == "any-of-any":
        return any(call_inner(fn, [x, y]) for x in first for y in second)
    if name == "all-of-all":
        return all(call_inner(fn, [x, y]) for x in first for y in second)
    if name == "all-of-any":
        return all(any(call_inner(fn, [x, y]) for y in second) for x in first)
    if name == "any-of-all":
        return any(all(call_inner(fn, [x, y]) for y in second) for x in first)
    raise processing_error(f"unknown higher-order function {name}")


# --- targets -------------------------------------------------------------------------------------
@dataclass
class Match:
    function: Function
    value: Any
    designator: Designator

    def evaluate(self, ctx: Context) -> bool:
        bag = self.designator.evaluate(ctx)
        error: Indeterminate | None = None
        for v in bag:
            try:
                if call_inner(self.function, [self.value, v]):
                    return True
            except Indeterminate as exc:
                error = error or exc
        if error:
            raise error
        return False


def _all_true(items: Iterable[Any], ctx: Context) -> bool:
    """AND with Indeterminate: False wins over an error, an error over True."""
    error = None
    for item in items:
        try:
            if not item.evaluate(ctx):
                return False
        except Indeterminate as exc:
            error = error or exc
    if error:
        raise error
    return True


@dataclass
class AllOf:
    matches: list[Match]

    def evaluate(self, ctx: Context) -> bool:
        return _all_true(self.matches, ctx)


@dataclass
class AnyOf:
    all_ofs: list[AllOf]

    def evaluate(self, ctx: Context) -> bool:
        error = None
        for a in self.all_ofs:
            try:
                if a.evaluate(ctx):
                    return True
            except Indeterminate as exc:
                error = error or exc
        if error:
            raise error
        return False


@dataclass
class Target:
    any_ofs: list[AnyOf]

    def evaluate(self, ctx: Context) -> bool:
        return _all_true(self.any_ofs, ctx) if self.any_ofs else True


# --- obligations and advice -------------------------------------------------------------------------
@dataclass
class AssignmentExpr:
    attribute_id: str
    category: str | None
    issuer: str | None
    expression: Expr


@dataclass
class ObligationExpr:
    id: str
    applies_to: str  # PERMIT or DENY
    assignments: list[AssignmentExpr]

    def evaluate(self, ctx: Context) -> Obligation:
        out = []
        for a in self.assignments:
            v = a.expression.evaluate(ctx)
            values = v if a.expression.type[1] else [v]
            for item in values:
                out.append(AttributeAssignment(a.attribute_id, a.expression.type[0], item, a.category, a.issuer))
        return Obligation(self.id, tuple(out))


def _indeterminate_for(effect: str) -> str:
    return IND_P if effect == PERMIT else IND_D


def add_obligations(result: Result, obligations: list[ObligationExpr], advice: list[ObligationExpr], ctx: Context) -> Result:
    """Append this element's obligations/advice for the decision; an error makes it Indeterminate."""
    if result.decision not in (PERMIT, DENY) or not (obligations or advice):
        return result
    try:
        obl = [o.evaluate(ctx) for o in obligations if o.applies_to == result.decision]
        adv = [o.evaluate(ctx) for o in advice if o.applies_to == result.decision]
    except Indeterminate as exc:
        return Result(_indeterminate_for(result.decision), exc.status)
    result.obligations.extend(obl)
    result.advice.extend(adv)
    return result


# --- rules, policies, policy sets ---------------------------------------------------------------------
@dataclass
class Rule:
    id: str
    effect: str
    target: Target
    condition: Expr | None
    obligations: list[ObligationExpr]
    advice: list[ObligationExpr]

    def evaluate(self, ctx: Context) -> Result:
        try:
            if not self.target.evaluate(ctx):
                return Result(NA)
            if self.condition is not None and not self.condition.evaluate(ctx):
                return Result(NA)
        except Indeterminate as exc:
            return Result(_indeterminate_for(self.effect), exc.status)
        return add_obligations(Result(self.effect), self.obligations, self.advice, ctx)


def _after_indeterminate_target(result: Result, status: Status) -> Result:
    """§7.12/7.13: a policy whose target is Indeterminate."""
    if result.decision == NA:
        return Result(NA)
    if result.decision == PERMIT:
        return Result(IND_P, status)
    if result.decision == DENY:
        return Result(IND_D, status)
    return Result(result.decision, result.status if result.status.code != OK else status)


@dataclass
class Policy:
    id: str
    version: str
    target: Target
    algorithm: Any  # combining.Algorithm
    rules: list[Rule]
    obligations: list[ObligationExpr]
    advice: list[ObligationExpr]
    source: str = ""
    is_set: bool = False

    def is_applicable(self, ctx: Context) -> bool:
        return self.target.evaluate(ctx)

    def evaluate(self, ctx: Context) -> Result:
        try:
            if not self.target.evaluate(ctx):
                return Result(NA)
            target_error = None
        except Indeterminate as exc:
            target_error = exc.status
        result = self.algorithm.combine(self._members(), ctx)
        if target_error is not None:
            result = _after_indeterminate_target(result, target_error)
        else:
            result = add_obligations(result, self.obligations, self.advice, ctx)
        if result.decision != NA:
            ctx.applicable.append(("PolicySet" if self.is_set else "Policy", self.id, self.version))
        return result

    def _members(self) -> list[Any]:
        """What the combining algorithm combines: rules here, policies in a PolicySet."""
        return self.rules


@dataclass
class PolicySet(Policy):
    is_set: bool = True
    children: list[Any] = field(default_factory=list)

    def _members(self) -> list[Any]:
        return self.children

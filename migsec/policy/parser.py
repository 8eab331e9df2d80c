"""XACML 3.0 policy XML -> ``model`` objects, with static checks.

Every error names the file, the line and the element. Checks done at load: known functions,
data types and combining algorithms; argument types of every Apply and Match; a boolean
Condition; unique Rule/Variable/Policy/PolicySet ids; defined, acyclic variable and policy
references; constant sub-expressions are folded, so a constant that cannot be evaluated is
refused here rather than at request time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from lxml import etree

from migsec.errors import PolicyReferenceError, PolicySyntaxError
from migsec.policy import combining, functions
from migsec.policy import datatypes as T
from migsec.policy import model as M
from migsec.policy.functions import StaticTypeError
from migsec.policy.xmlsafe import parse_xml

NS = "urn:oasis:names:tc:xacml:3.0:core:schema:wd-17"
X = "{" + NS + "}"
SUBJECT_CAT = "urn:oasis:names:tc:xacml:1.0:subject-category:access-subject"


def local(el: etree._Element) -> str:
    return etree.QName(el).localname if isinstance(el.tag, str) else ""


def children(el: etree._Element, name: str | None = None) -> list[etree._Element]:
    return [c for c in el if isinstance(c.tag, str) and (name is None or c.tag == X + name)]


class Reference:
    """A PolicyIdReference/PolicySetIdReference until the store resolves it."""

    def __init__(self, kind: str, ref_id: str, version: str | None, where: str) -> None:
        self.kind, self.ref_id, self.version, self.where = kind, ref_id, version, where
        self.target: M.Policy | None = None

    def evaluate(self, ctx: M.Context) -> M.Result:
        return self.target.evaluate(ctx)  # type: ignore[union-attr]

    def is_applicable(self, ctx: M.Context) -> bool:
        return self.target.is_applicable(ctx)  # type: ignore[union-attr]


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.references: list[Reference] = []
        self.ids: set[tuple[bool, str]] = set()  # Policy/PolicySet ids defined inline in this document

    def unique(self, el: etree._Element, is_set: bool, pid: str) -> None:
        if (is_set, pid) in self.ids:
            raise self.fail(el, f"duplicate {'PolicySetId' if is_set else 'PolicyId'} {pid!r} in one document")
        self.ids.add((is_set, pid))

    def fail(self, el: etree._Element, message: str) -> PolicySyntaxError:
        return PolicySyntaxError(f"{self.source}:{el.sourceline}: <{local(el)}>: {message}")

    def attr(self, el: etree._Element, name: str, required: bool = True, default: str | None = None) -> Any:
        v = el.get(name)
        if v is None and required:
            raise self.fail(el, f"missing required attribute {name}")
        return v if v is not None else default

    # --- top level --------------------------------------------------------------------------------
    def top(self, el: etree._Element) -> M.Policy:
        if el.tag == X + "Policy":
            return self.policy(el)
        if el.tag == X + "PolicySet":
            return self.policy_set(el)
        raise self.fail(el, f"expected a Policy or PolicySet in namespace {NS}, got {el.tag}")

    def algorithm(self, el: etree._Element, name: str, for_rules: bool) -> combining.Algorithm:
        alg_id = self.attr(el, name)
        alg = combining.ALGORITHMS.get(alg_id)
        if alg is None or alg.for_rules != for_rules:
            raise self.fail(el, f"unknown {'rule' if for_rules else 'policy'}-combining algorithm {alg_id!r}")
        return alg

    def policy(self, el: etree._Element) -> M.Policy:
        pid = self.attr(el, "PolicyId")
        self.unique(el, False, pid)
        alg = self.algorithm(el, "RuleCombiningAlgId", True)
        self.variables: dict[str, Any] = {}
        raw_vars = {}
        for v in children(el, "VariableDefinition"):
            vid = self.attr(v, "VariableId")
            if vid in raw_vars:
                raise self.fail(v, f"duplicate VariableId {vid!r} in policy {pid!r}")
            raw_vars[vid] = v
        self.raw_vars = raw_vars
        self.var_stack: list[str] = []
        for vid in raw_vars:
            self.variable(vid, raw_vars[vid])
        rules, target, obligations, advice = [], M.Target([]), [], []
        seen_rules: set[str] = set()
        for c in children(el):
            name = local(c)
            if name == "Target":
                target = self.target(c)
            elif name == "Rule":
                rule = self.rule(c)
                if rule.id in seen_rules:
                    raise self.fail(c, f"duplicate RuleId {rule.id!r} in policy {pid!r}")
                seen_rules.add(rule.id)
                rules.append(rule)
            elif name == "ObligationExpressions":
                obligations = self.obligations(c, "ObligationExpression", "ObligationId", "FulfillOn")
            elif name == "AdviceExpressions":
                advice = self.obligations(c, "AdviceExpression", "AdviceId", "AppliesTo")
            elif name in ("Description", "PolicyIssuer", "PolicyDefaults", "VariableDefinition",
                          "CombinerParameters", "RuleCombinerParameters"):
                continue
            else:
                raise self.fail(c, "unexpected element in Policy")
        return M.Policy(pid, el.get("Version", "1.0"), target, alg, rules, obligations, advice, self.source)

    def policy_set(self, el: etree._Element) -> M.PolicySet:
        psid = self.attr(el, "PolicySetId")
        self.unique(el, True, psid)
        alg = self.algorithm(el, "PolicyCombiningAlgId", False)
        target, obligations, advice = M.Target([]), [], []
        items: list[Any] = []  # policies, policy sets and references, in document order
        for c in children(el):
            name = local(c)
            if name == "Target":
                target = self.target(c)
            elif name == "Policy":
                items.append(self.policy(c))
            elif name == "PolicySet":
                items.append(self.policy_set(c))
            elif name in ("PolicyIdReference", "PolicySetIdReference"):
                ref_id = (c.text or "").strip()
                if not ref_id:
                    raise self.fail(c, "empty reference")
                ref = Reference(name[: -len("IdReference")], ref_id, c.get("Version"), f"{self.source}:{c.sourceline}")
                self.references.append(ref)
                items.append(ref)
            elif name == "ObligationExpressions":
                obligations = self.obligations(c, "ObligationExpression", "ObligationId", "FulfillOn")
            elif name == "AdviceExpressions":
                advice = self.obligations(c, "AdviceExpression", "AdviceId", "AppliesTo")
            elif name in ("Description", "PolicySetIssuer", "PolicySetDefaults", "CombinerParameters",
                          "PolicyCombinerParameters", "PolicySetCombinerParameters"):
                continue
            else:
                raise self.fail(c, "unexpected element in PolicySet")
        ps = M.PolicySet(psid, el.get("Version", "1.0"), target, alg, [], obligations, advice, self.source)
        ps.children = items
        return ps

    # --- rules, targets ----------------------------------------------------------------------------
    def rule(self, el: etree._Element) -> M.Rule:
        rid = self.attr(el, "RuleId")
        effect = self.attr(el, "Effect")
        if effect not in (M.PERMIT, M.DENY):
            raise self.fail(el, f"Effect must be Permit or Deny, not {effect!r}")
        target, condition, obligations, advice = M.Target([]), None, [], []
        for c in children(el):
            name = local(c)
            if name == "Target":
                target = self.target(c)
            elif name == "Condition":
                exprs = children(c)
                if len(exprs) != 1:
                    raise self.fail(c, "a Condition holds exactly one expression")
                condition = self.expression(exprs[0])
                if condition.type != functions.BOOL:
                    raise self.fail(c, f"the Condition must be a boolean, not {functions._tname(condition.type)}")
            elif name == "ObligationExpressions":
                obligations = self.obligations(c, "ObligationExpression", "ObligationId", "FulfillOn")
            elif name == "AdviceExpressions":
                advice = self.obligations(c, "AdviceExpression", "AdviceId", "AppliesTo")
            elif name != "Description":
                raise self.fail(c, "unexpected element in Rule")
        return M.Rule(rid, effect, target, condition, obligations, advice)

    def target(self, el: etree._Element) -> M.Target:
        any_ofs = []
        for a in children(el):
            if local(a) != "AnyOf":
                raise self.fail(a, "a Target holds only AnyOf")
            all_ofs = []
            for b in children(a):
                if local(b) != "AllOf":
                    raise self.fail(b, "an AnyOf holds only AllOf")
                matches = [self.match(m) for m in children(b)]
                if not matches:
                    raise self.fail(b, "an AllOf needs at least one Match")
                all_ofs.append(M.AllOf(matches))
            if not all_ofs:
                raise self.fail(a, "an AnyOf needs at least one AllOf")
            any_ofs.append(M.AnyOf(all_ofs))
        return M.Target(any_ofs)

    def match(self, el: etree._Element) -> M.Match:
        if local(el) != "Match":
            raise self.fail(el, "an AllOf holds only Match")
        fid = self.attr(el, "MatchId")
        fn = functions.lookup(fid)
        if fn is None or fn.higher_order:
            raise self.fail(el, f"unknown match function {fid!r}")
        parts = children(el)
        if len(parts) != 2 or local(parts[0]) != "AttributeValue":
            raise self.fail(el, "a Match holds an AttributeValue and an AttributeDesignator")
        value = self.value(parts[0])
        designator = self.expression(parts[1])
        if not isinstance(designator, M.Designator):
            raise self.fail(parts[1], "the second element of a Match must be an AttributeDesignator")
        try:
            ret = fn.check([value.type, (designator.datatype, False)])
        except StaticTypeError as exc:
            raise self.fail(el, str(exc)) from exc
        if ret != functions.BOOL:
            raise self.fail(el, f"match function {fid} does not return a boolean")
        return M.Match(fn, value.value, designator)

    # --- expressions ----------------------------------------------------------------------------------
    def value(self, el: etree._Element) -> M.Value:
        dt = T.canonical(self.attr(el, "DataType"))
        if dt == T.XPATHEXPRESSION:
            raise self.fail(el, "xpathExpression values (XPath) are not supported")
        if children(el):
            raise self.fail(el, "structured AttributeValue content is not supported")
        try:
            return M.Value((dt, False), T.parse_value(dt, el.text or ""))
        except T.ValueSyntaxError as exc:
            raise self.fail(el, str(exc)) from exc

    def expression(self, el: etree._Element) -> M.Expr:
        name = local(el)
        if name == "AttributeValue":
            return self.value(el)
        if name == "AttributeDesignator":
            dt = T.canonical(self.attr(el, "DataType"))
            if dt not in T.DATATYPES:
                raise self.fail(el, f"unsupported data type {dt!r}")
            mbp = self.attr(el, "MustBePresent")
            if mbp not in ("true", "false", "1", "0"):
                raise self.fail(el, f"MustBePresent must be a boolean, not {mbp!r}")
            return M.Designator(self.attr(el, "Category"), self.attr(el, "AttributeId"), dt, el.get("Issuer"),
                                mbp in ("true", "1"))
        if name == "AttributeSelector":
            raise self.fail(el, "AttributeSelector (XPath over Content) is not supported")
        if name == "Function":
            fid = self.attr(el, "FunctionId")
            fn = functions.lookup(fid)
            if fn is None:
                raise self.fail(el, f"unknown function {fid!r}")
            return M.FunctionRef(fn)
        if name == "VariableReference":
            vid = self.attr(el, "VariableId")
            if vid not in getattr(self, "raw_vars", {}):
                raise self.fail(el, f"undefined variable {vid!r}")
            definition = self.variable(vid, self.raw_vars[vid])
            return M.VariableRef(vid, definition, definition.expression.type)
        if name == "Apply":
            return self.apply(el)
        raise self.fail(el, "not an expression")

    def variable(self, vid: str, el: etree._Element) -> M.VariableDefinition:
        done = self.variables.get(vid)
        if done is not None:
            return done
        if vid in self.var_stack:
            raise self.fail(el, f"circular variable reference {' -> '.join(self.var_stack + [vid])}")
        self.var_stack.append(vid)
        exprs = children(el)
        if len(exprs) != 1:
            raise self.fail(el, "a VariableDefinition holds exactly one expression")
        definition = M.VariableDefinition(vid, self.expression(exprs[0]))
        self.var_stack.pop()
        self.variables[vid] = definition
        return definition

    def apply(self, el: etree._Element) -> M.Expr:
        fid = self.attr(el, "FunctionId")
        fn = functions.lookup(fid)
        if fn is None:
            raise self.fail(el, f"unknown function {fid!r}")
        args = [self.expression(c) for c in children(el) if local(c) != "Description"]
        fn_arg = args[0].function if args and isinstance(args[0], M.FunctionRef) else None
        try:
            ret = fn.check([a.type for a in args], fn_arg)
        except StaticTypeError as exc:
            raise self.fail(el, str(exc)) from exc
        node = M.Apply(fn, args, ret)
        if all(isinstance(a, (M.Value, M.FunctionRef)) for a in args) and not fn.higher_order:
            try:  # fold constants: a constant error is a static error
                return M.Value(ret, node.evaluate(M.Context({})))
            except M.Indeterminate as exc:
                raise self.fail(el, f"constant expression fails: {exc.status.message}") from exc
        return node

    # --- obligations and advice ------------------------------------------------------------------------
    def obligations(self, el: etree._Element, child: str, id_attr: str, on_attr: str) -> list[M.ObligationExpr]:
        out = []
        for o in children(el):
            if local(o) != child:
                raise self.fail(o, f"expected {child}")
            on = self.attr(o, on_attr)
            if on not in (M.PERMIT, M.DENY):
                raise self.fail(o, f"{on_attr} must be Permit or Deny")
            assignments = []
            for a in children(o):
                if local(a) != "AttributeAssignmentExpression":
                    raise self.fail(a, "expected AttributeAssignmentExpression")
                exprs = children(a)
                if len(exprs) != 1:
                    raise self.fail(a, "an AttributeAssignmentExpression holds exactly one expression")
                expr = self.expression(exprs[0])
                if expr.type == functions.FUNCTION_TYPE:
                    raise self.fail(a, "a Function is not a value")
                assignments.append(M.AssignmentExpr(self.attr(a, "AttributeId"), a.get("Category"), a.get("Issuer"), expr))
            out.append(M.ObligationExpr(self.attr(o, id_attr), on, assignments))
        return out


def parse_policy_bytes(data: bytes, source: str) -> tuple[M.Policy, list[Reference]]:
    """Parse one policy document; references are returned unresolved."""
    root = parse_xml(data, source, PolicySyntaxError)
    p = _Parser(source)
    policy = p.top(root)
    return policy, p.references


class PolicyStore:
    """Policies by id, one root, references resolved and checked for cycles."""

    def __init__(self, root: M.Policy, by_id: dict[tuple[bool, str], M.Policy], by_file: dict[str, M.Policy],
                 references: list[Reference] | None = None) -> None:
        self.root = root
        self.by_id = by_id
        self.by_file = by_file
        self.references = references or []

    def unreferenced(self) -> list[M.Policy]:
        """Top-level policies that no reference (at any depth) points to: candidate roots."""
        targets = {id(r.target) for r in self.references}
        return [p for p in self.by_file.values() if id(p) not in targets]


def load_policies(paths: Iterable[str | Path] | str | Path, root_id: str | None = None) -> PolicyStore:
    """Load policy files; the first is the root unless ``root_id`` names another."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[tuple[bytes, str]] = []
    for path in paths:
        path = Path(path)
        try:
            docs.append((path.read_bytes(), str(path)))
        except OSError as exc:
            raise PolicySyntaxError(f"{path}: cannot read policy: {exc.strerror}") from exc
    return load_policy_documents(docs, root_id)


def load_policy_documents(docs: list[tuple[bytes, str]], root_id: str | None = None) -> PolicyStore:
    if not docs:
        raise PolicySyntaxError("no policy given")
    by_id: dict[tuple[bool, str], M.Policy] = {}
    refs: list[Reference] = []
    tops = []
    for data, source in docs:
        policy, r = parse_policy_bytes(data, source)
        key = (policy.is_set, policy.id)
        if key in by_id:
            raise PolicySyntaxError(f"{source}: {'PolicySet' if policy.is_set else 'Policy'} {policy.id!r} "
                                    f"is also defined in {by_id[key].source}")
        by_id[key] = policy
        refs.extend(r)
        tops.append(policy)
    for ref in refs:
        target = by_id.get((ref.kind == "PolicySet", ref.ref_id))
        if target is None:
            raise PolicyReferenceError(f"{ref.where}: {ref.kind}IdReference to undefined {ref.kind} {ref.ref_id!r}")
        if ref.version is not None and target.version != ref.version:
            raise PolicyReferenceError(f"{ref.where}: {ref.kind} {ref.ref_id!r} version {ref.version} "
                                       f"not found (have {target.version})")
        ref.target = target
    if root_id is None:
        root = tops[0]
    else:
        found = [p for p in tops if p.id == root_id]
        if not found:
            raise PolicyReferenceError(f"no top-level policy {root_id!r}")
        root = found[0]
    for policy in tops:
        _check_cycles(policy, [])
    return PolicyStore(root, by_id, {p.source: p for p in tops}, refs)


def _check_cycles(node: Any, stack: list[str]) -> None:
    if isinstance(node, Reference):
        node = node.target
    if not isinstance(node, M.PolicySet):
        return
    key = f"PolicySet {node.id!r}"
    if key in stack:
        raise PolicyReferenceError(f"circular policy reference: {' -> '.join(stack + [key])}")
    for child in node.children:
        _check_cycles(child, stack + [key])

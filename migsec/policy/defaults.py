"""The default migration policies, rendered from a few operator settings.

Operators set the trusted domains and the limits (``migsec policy init-defaults``) instead of
editing XACML by hand. The files written are ordinary XACML 3.0 and can be edited afterwards.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from lxml import etree

from migsec.errors import ConfigError
from migsec.fsutil import atomic_write
from migsec.policy import attributes as A
from migsec.policy import datatypes as T
from migsec.policy.parser import NS

DEFAULT_DIR = Path(__file__).parent / "default"
# the values the shipped files in migsec/policy/default/ were rendered with
SHIPPED = dict(trusted_domains=["cloud-a.example", "cloud-b.example"], max_vcpus=8, max_memory_gib=16,
               bandwidth_mib_s=100)

F = "urn:oasis:names:tc:xacml:1.0:function:"
R_DUP = "urn:oasis:names:tc:xacml:3.0:rule-combining-algorithm:deny-unless-permit"
P_DUP = "urn:oasis:names:tc:xacml:3.0:policy-combining-algorithm:deny-unless-permit"
ROOT_ID, SOURCE_ID, DEST_ID = "urn:migsec:policy:root", "urn:migsec:policy:source", "urn:migsec:policy:destination"
_DID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")


def _el(tag: str, parent: etree._Element | None = None, text: str | None = None, **attrs: str) -> etree._Element:
    name = "{%s}%s" % (NS, tag)
    el = etree.Element(name, attrs, nsmap={None: NS}) if parent is None else etree.SubElement(parent, name, attrs)
    if text is not None:
        el.text = text
    return el


def _value(parent: etree._Element, dt: str, text: str) -> None:
    _el("AttributeValue", parent, text, DataType=dt)


def _designator(parent: etree._Element, category: str, attr_id: str, dt: str, must: bool = True) -> None:
    _el("AttributeDesignator", parent, Category=category, AttributeId=attr_id, DataType=dt,
        MustBePresent="true" if must else "false")


def _apply(parent: etree._Element, fn: str) -> etree._Element:
    return _el("Apply", parent, FunctionId=F + fn)


def _action_target(policy: etree._Element, action: str) -> None:
    target = _el("Target", policy)
    match = _el("Match", _el("AllOf", _el("AnyOf", target)), MatchId=F + "string-equal")
    _value(match, T.STRING, action)
    _designator(match, A.ACTION, A.ACTION_ID, T.STRING)


def _in_list(parent: etree._Element, category: str, attr_id: str, allowed: list[str]) -> None:
    is_in = _apply(parent, "string-is-in")
    _designator(_apply(is_in, "string-one-and-only"), category, attr_id, T.STRING)
    bag = _apply(is_in, "string-bag")
    for d in allowed:
        _value(bag, T.STRING, d)


def _at_most(parent: etree._Element, attr_id: str, limit: int) -> None:
    le = _apply(parent, "integer-less-than-or-equal")
    _designator(_apply(le, "integer-one-and-only"), A.RESOURCE, attr_id, T.INTEGER)
    _value(le, T.INTEGER, str(limit))


def _reason(policy: etree._Element, text: str) -> None:
    advice = _el("AdviceExpression", _el("AdviceExpressions", policy), AdviceId=A.ADVICE_REASON, AppliesTo="Deny")
    _value(_el("AttributeAssignmentExpression", advice, AttributeId=A.ASSIGN_REASON), T.STRING, text)


def source_policy(trusted_domains: list[str]) -> etree._Element:
    p = _el("Policy", PolicyId=SOURCE_ID, Version="1.0", RuleCombiningAlgId=R_DUP)
    _el("Description", p, "Source domain: members of role migration-admin may migrate VMs to trusted domains.")
    _action_target(p, A.ACTION_MIGRATE)
    rule = _el("Rule", p, RuleId=SOURCE_ID + ":admin-to-trusted", Effect="Permit")
    cond = _apply(_el("Condition", rule), "and")
    is_in = _apply(cond, "string-is-in")
    _value(is_in, T.STRING, A.ROLE_MIGRATION_ADMIN)
    _designator(is_in, A.SUBJECT, A.ROLE, T.STRING, must=False)
    _in_list(cond, A.ENVIRONMENT, A.DESTINATION_DOMAIN, trusted_domains)
    _reason(p, "only role migration-admin may migrate, and only to a trusted domain")
    return p


def destination_policy(accept_from: list[str], max_vcpus: int, max_memory_gib: int, bandwidth_mib_s: int) -> etree._Element:
    p = _el("Policy", PolicyId=DEST_ID, Version="1.0", RuleCombiningAlgId=R_DUP)
    _el("Description", p, f"Destination domain: accept VMs from listed domains only, at most {max_vcpus} vCPUs "
                          f"and {max_memory_gib} GiB memory, at most {bandwidth_mib_s} MiB/s.")
    _action_target(p, A.ACTION_RECEIVE)
    rule = _el("Rule", p, RuleId=DEST_ID + ":accept-listed-within-limits", Effect="Permit")
    cond = _apply(_el("Condition", rule), "and")
    _in_list(cond, A.ENVIRONMENT, A.SOURCE_DOMAIN, accept_from)
    _at_most(cond, A.VCPUS, max_vcpus)
    _at_most(cond, A.MEMORY_BYTES, max_memory_gib * 1024**3)
    obl = _el("ObligationExpression", _el("ObligationExpressions", p), ObligationId=A.OBLIGATION_MAX_BANDWIDTH, FulfillOn="Permit")
    _value(_el("AttributeAssignmentExpression", obl, AttributeId=A.ASSIGN_BANDWIDTH_MIB_S), T.INTEGER, str(bandwidth_mib_s))
    _reason(p, f"accepted only from listed domains, with at most {max_vcpus} vCPUs and {max_memory_gib} GiB memory")
    return p


def root_policy_set() -> etree._Element:
    ps = _el("PolicySet", PolicySetId=ROOT_ID, Version="1.0", PolicyCombiningAlgId=P_DUP)
    _el("Description", ps, "migsec root: Permit only what the source or destination policy permits.")
    _el("Target", ps)
    _el("PolicyIdReference", ps, SOURCE_ID)
    _el("PolicyIdReference", ps, DEST_ID)
    return ps


def _check_domains(name: str, domains: Iterable[str]) -> list[str]:
    out = [d for d in domains]
    if not out:
        raise ConfigError(f"{name}: at least one domain id is needed")
    for d in out:
        if not isinstance(d, str) or not _DID_RE.fullmatch(d):
            raise ConfigError(f"{name}: {d!r} is not a valid domain id (letters, digits, '.', '-')")
    return out


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, not {value!r}")
    return value


def render_default_policies(trusted_domains: Iterable[str], max_vcpus: int, max_memory_gib: int,
                            bandwidth_mib_s: int, out_dir: str | Path, *,
                            accept_from: Iterable[str] | None = None) -> list[Path]:
    """Write root.xml, source.xml and destination.xml into ``out_dir``; return their paths.

    ``accept_from`` (domains the destination accepts VMs from) defaults to ``trusted_domains``.
    """
    trusted = _check_domains("trusted_domains", trusted_domains)
    accept = _check_domains("accept_from", accept_from) if accept_from is not None else trusted
    docs = {
        "root.xml": root_policy_set(),
        "source.xml": source_policy(trusted),
        "destination.xml": destination_policy(accept, _positive("max_vcpus", max_vcpus),
                                              _positive("max_memory_gib", max_memory_gib),
                                              _positive("bandwidth_mib_s", bandwidth_mib_s)),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, el in docs.items():
        path = out / name
        data = etree.tostring(el, xml_declaration=True, encoding="UTF-8", pretty_print=True)
        # a half-written policy must never be loaded; 0o666 less umask, as write_bytes gave
        atomic_write(path, data, mode=0o666)
        paths.append(path)
    return paths

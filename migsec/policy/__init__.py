"""XACML 3.0 policy decision point for migsec (see docs/policy.md).

    pdp = PDP.from_directory(dir)            # or PDP(load_policies([root, *refs]))
    d = authorize(pdp, subject={...}, resource={...}, action="migrate", environment={...})
    d.decision, d.obligations                # "Permit" | "Deny" | ...; [Obligation(id, attributes)]
"""
from migsec.policy.api import Decision, Obligation, authorize, build_request
from migsec.policy.defaults import DEFAULT_DIR, render_default_policies
from migsec.policy.parser import PolicyStore, load_policies
from migsec.policy.pdp import PDP, Response
from migsec.policy.request import Request, parse_request, parse_request_json, parse_request_xml

__all__ = [
    "DEFAULT_DIR", "PDP", "Decision", "Obligation", "PolicyStore", "Request", "Response", "authorize",
    "build_request", "load_policies", "parse_request", "parse_request_json", "parse_request_xml",
    "render_default_policies",
]

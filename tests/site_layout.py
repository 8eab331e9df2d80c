"""The site layout that process-level tests (daemon, state, e2e) write a migsecd.toml for.

The domain's files sit at the site root as ``migsec ca issue --out pki`` and
``migsec policy init-defaults policies`` leave them; every such config starts with
the same ``[domain]`` and ``[paths]`` sections, written once here.
"""


def domain_and_paths(did: str) -> str:
    """The ``[domain]`` and ``[paths]`` sections for ``did`` (paths relative to the config)."""
    return f"""\
[domain]
id = "{did}"
key = "pki/domain-key.pem"
certificate = "pki/domain-cert.pem"
trust = ["pki/ca-cert.pem"]

[paths]
state_dir = "state"
users = "users.json"
peers = "peers.json"
policy_dir = "policies"
sk3 = "sk3.key"
"""

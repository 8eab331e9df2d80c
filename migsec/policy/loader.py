"""The one policy-directory loader: migsecd (start and SIGHUP), ``migsec doctor`` and
``migsec policy check`` all read a policy directory through ``load_policy_directory``.

A directory holds XACML files (``*.xml``). Its root is the one Policy or PolicySet that no
other references; every other policy must be reachable from that root through
``PolicyIdReference`` / ``PolicySetIdReference`` (else it would silently never be evaluated),
so a directory with several unreferenced policies, or with policies only an unreachable one
references, is refused, naming them. ``[paths].policy_dir`` is either such a directory (one
policy set for both actions, as ``migsec policy init-defaults`` writes it) or holds the two
subdirectories ``source/`` (action ``migrate``) and ``destination/`` (``receive-migration``),
each such a directory: ``load_policy_dir``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migsec.errors import PolicyError, PolicyReferenceError
from migsec.policy import model as M
from migsec.policy.parser import PolicyStore, Reference, load_policies


def load_policy_directory(directory: str | Path) -> PolicyStore:
    """Load every ``*.xml`` of ``directory``; its root is the one unreferenced policy, and every
    policy must be reachable from it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyError(f"policy directory {directory} does not exist")
    files = sorted(directory.glob("*.xml"))
    if not files:
        raise PolicyError(f"policy directory {directory} holds no *.xml policy")
    store = load_policies(files)
    roots = store.unreferenced()
    if not roots:  # every policy is referenced by another: cycles are refused by the parser
        raise PolicyReferenceError(f"{directory}: no root policy (every policy is referenced by another)")
    if len(roots) > 1:
        named = [p for p in roots if Path(p.source).name == "root.xml"]
        if not named:
            raise PolicyReferenceError(
                f"{directory}: need exactly one root policy (not referenced by another), found "
                f"{len(roots)}: {_names(roots)}; reference the others from one PolicySet")
        root = named[0]
    else:
        root = roots[0]
    store.root = root
    reached = reachable(root)
    lost = [p for p in store.by_file.values() if id(p) not in reached]
    if lost:
        raise PolicyReferenceError(
            f"{directory}: not reachable from the root {_name(root)}, so never evaluated: {_names(lost)}; "
            f"reference them from the root PolicySet or move them out of the directory")
    return store


def reachable(root: M.Policy) -> set[int]:
    """``id()`` of every top-level policy evaluated from ``root`` (through references)."""
    seen: set[int] = set()
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Reference):
            node = node.target
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, M.PolicySet):
            stack.extend(node.children)
    return seen


@dataclass(frozen=True)
class PolicyDir:
    """What ``[paths].policy_dir`` holds: the store for each action and the layout."""

    source: PolicyStore  # action migrate
    destination: PolicyStore  # action receive-migration
    split: bool  # source/ + destination/, else one set for both
    directories: tuple[Path, ...]

    @property
    def count(self) -> int:
        stores = (self.source, self.destination) if self.split else (self.source,)
        return sum(len(s.by_file) for s in stores)


def load_policy_dir(policy_dir: str | Path) -> PolicyDir:
    """``[paths].policy_dir``: ``source/`` + ``destination/`` when both exist, else one set."""
    policy_dir = Path(policy_dir)
    source_dir, dest_dir = policy_dir / "source", policy_dir / "destination"
    if source_dir.is_dir() and dest_dir.is_dir():
        return PolicyDir(load_policy_directory(source_dir), load_policy_directory(dest_dir), True,
                         (source_dir, dest_dir))
    if source_dir.is_dir() != dest_dir.is_dir():
        only = source_dir if source_dir.is_dir() else dest_dir
        if not any(policy_dir.glob("*.xml")):
            raise PolicyError(f"{policy_dir} has {only.name}/ but not "
                              f"{'destination' if only is source_dir else 'source'}/: give both, or put one "
                              f"policy set directly in {policy_dir}")
    store = load_policy_directory(policy_dir)
    return PolicyDir(store, store, False, (policy_dir,))


def _name(policy: M.Policy) -> str:
    return f"{'PolicySet' if policy.is_set else 'Policy'} {policy.id} ({Path(policy.source).name})"


def _names(policies: list[M.Policy]) -> str:
    return ", ".join(_name(p) for p in sorted(policies, key=lambda p: p.source))

"""Every case of the XACML 3.0 conformance suite in ../shared/xacml-conformance.

All of mandatory/ must pass. Any other case passes or is listed, with a reason, in
tests/data/policy/unsupported.txt; an unlisted failure fails this test, and so does a listed case
that passes (so the list stays true).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from xacml_suite import SUITE, discover, load_unsupported, run_case

UNSUPPORTED = Path(__file__).resolve().parents[1] / "data" / "policy" / "unsupported.txt"

pytestmark = pytest.mark.skipif(not (SUITE / "INDEX.tsv").exists(),
                                reason=f"XACML conformance suite not found at {SUITE} (set MIGSEC_XACML_SUITE)")


def test_discovery_finds_every_indexed_case():
    rows = [l.split("\t") for l in (SUITE / "INDEX.tsv").read_text().splitlines()[1:] if l.strip()]
    indexed = {(r[0], r[1], r[3].split()[0]) for r in rows}  # kind may carry " +Special.txt"
    found = {(c.folder, c.id, c.kind) for c in discover()}
    assert found == indexed


def test_conformance_suite():
    unsupported = load_unsupported(UNSUPPORTED)
    cases = discover()
    passed: Counter = Counter()
    total: Counter = Counter()
    unexpected, stale = [], []
    for case in cases:
        total[case.folder] += 1
        reason = run_case(case)
        if reason is None:
            passed[case.folder] += 1
            if case.name in unsupported:
                stale.append(case.name)
        elif case.name not in unsupported or case.folder.endswith("/mandatory"):
            unexpected.append(f"{case.name}: {reason}")
    print("\nXACML conformance, passed / cases per folder:")
    for folder in total:
        print(f"  {folder:45s} {passed[folder]:4d} / {total[folder]}")
    print(f"  {'total':45s} {sum(passed.values()):4d} / {sum(total.values())}; "
          f"listed unsupported: {len(unsupported)}")
    unknown = set(unsupported) - {c.name for c in cases}
    assert not unknown, f"unsupported.txt names cases that do not exist: {sorted(unknown)}"
    assert not stale, "listed as unsupported but passes now (remove from unsupported.txt): " + ", ".join(stale)
    assert not unexpected, f"{len(unexpected)} unexpected failures:\n" + "\n".join(unexpected)

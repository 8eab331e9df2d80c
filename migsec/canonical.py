"""The one canonical JSON form that migsec hashes and signs.

Sorted keys, no whitespace, no NaN or infinities. Protocol messages keep non-ASCII
characters as UTF-8; the audit ledger escapes them (``ascii=True``) so that each
line is plain ASCII. Both forms are fixed: digests already signed depend on them.
"""
from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any, *, ascii: bool = False) -> bytes:
    """``value`` in canonical form; TypeError / ValueError if it is not plain JSON."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii,
                      allow_nan=False)
    return text.encode("ascii" if ascii else "utf-8")

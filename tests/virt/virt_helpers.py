"""Shared constants and helpers for the migsec.virt tests."""
from __future__ import annotations

from pathlib import Path

from lxml import etree

DATA = Path(__file__).resolve().parent.parent / "data" / "virt"
TEST_URI = "test:///default"


def data_xml(name: str) -> str:
    return (DATA / name).read_text()


def xml_differences(before: str, after: str) -> set[tuple[str, str, str | None, str | None]]:
    """Every (element path, attribute or '#text', old, new) that differs; structure must match."""
    a = etree.fromstring(before.encode()).getroottree()
    b = etree.fromstring(after.encode()).getroottree()
    ea, eb = list(a.getroot().iter()), list(b.getroot().iter())
    assert [e.tag for e in ea] == [e.tag for e in eb], "element structure changed"
    diffs: set[tuple[str, str, str | None, str | None]] = set()
    for x, y in zip(ea, eb):
        path = a.getpath(x)
        if (x.text or "").strip() != (y.text or "").strip():
            diffs.add((path, "#text", (x.text or "").strip(), (y.text or "").strip()))
        for key in set(x.attrib) | set(y.attrib):
            if x.get(key) != y.get(key):
                diffs.add((path, key, x.get(key), y.get(key)))
    return diffs

"""The "given away" mark on a source's kept definition (no libvirt here: the hook reads it).

After a committed migration without ``--undefinesource`` the source keeps the domain's
persistent definition, shut off. Starting it would run the guest a second time while it
runs at the destination, so migsecd marks the kept definition in its ``<metadata>``::

    <metadata>
      <migsec-moved:moved xmlns:migsec-moved="https://migsec.example/xmlns/1/moved"
          migration="MID" destination="cloud-b.example" at="2026-12-03T09:00:00Z"/>
    </metadata>

and the libvirt hook refuses ``start begin`` of a domain whose XML carries it, until an
operator runs ``migsec release DOMAIN`` (which removes it through libvirt). A migration
back into this host removes it too, once it is committed here.

It has its own namespace because libvirt keeps one ``<metadata>`` element per namespace
and ``https://migsec.example/xmlns/1`` already holds the tags.
"""
from __future__ import annotations

from dataclasses import dataclass

from migsec import safexml
from migsec.errors import MigsecError

MOVED_NS = "https://migsec.example/xmlns/1/moved"
MOVED_PREFIX = "migsec-moved"
MAX_XML = 16 * 1024 * 1024


@dataclass(frozen=True)
class MovedMark:
    """Where and when the domain went: the migration id, the destination domain, an ISO time."""

    migration_id: str
    destination: str
    at: str

    def element(self) -> str:
        """The element for libvirt's setMetadata (without a namespace: libvirt adds MOVED_NS)."""
        from lxml import etree

        el = etree.Element("moved", migration=self.migration_id, destination=self.destination, at=self.at)
        return etree.tostring(el, encoding="unicode")


def moved_mark_of(root: object) -> MovedMark | None:
    """The mark in a parsed ``<domain>`` element (``migsec.safexml.parse_domain``), if any."""
    for el in root.iterfind(f"metadata/{{{MOVED_NS}}}moved"):  # type: ignore[attr-defined]
        return MovedMark(el.get("migration") or "?", el.get("destination") or "?", el.get("at") or "?")
    return None


def moved_mark(xml: bytes | str, *, error: type[MigsecError] = MigsecError) -> MovedMark | None:
    """The mark in a domain XML document, parsed as untrusted."""
    data = xml.encode() if isinstance(xml, str) else xml
    return moved_mark_of(safexml.parse_domain(data, max_size=MAX_XML, error=error))

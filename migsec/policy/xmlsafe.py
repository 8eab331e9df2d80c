"""Parse untrusted XML with DTDs, entities and network access refused."""
from __future__ import annotations

from lxml import etree

from migsec.errors import UnsafeXmlError

_DOCTYPE_MARKERS = tuple("<!DOCTYPE".encode(enc) for enc in ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"))


# A fresh parser per call: lxml parsers are not thread-safe.
def _parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                           huge_tree=False, remove_comments=True, remove_pis=True)


def parse_xml(data: bytes, source: str, error: type[Exception]) -> etree._Element:
    """Return the root element; refuse any DOCTYPE (so no entity can be declared or expanded).

    ``error`` is the exception class raised for malformed XML (it names ``source``).
    """
    if not isinstance(data, bytes):
        raise TypeError("parse_xml takes bytes, so the parser sees the declared encoding and BOM")
    # Refused before parsing: libxml2 would otherwise still read the internal subset (and may fail
    # on an entity bomb with a generic syntax error instead of saying what was refused).
    if any(m in data for m in _DOCTYPE_MARKERS):
        raise UnsafeXmlError(f"{source}: XML with a DOCTYPE (DTD or entity declarations) is refused")
    try:
        tree = etree.fromstring(data, _parser()).getroottree()
    except etree.XMLSyntaxError as exc:
        raise error(f"{source}: not well-formed XML: {exc}") from exc
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None or tree.docinfo.externalDTD is not None:
        raise UnsafeXmlError(f"{source}: XML with a DOCTYPE (DTD or entity declarations) is refused")
    root = tree.getroot()
    for el in root.iter():
        if isinstance(el, etree._Entity):
            raise UnsafeXmlError(f"{source}: XML entity references are refused")
    return root

"""The one safe parser of domain XML, for virt and for the libvirt hook.

The hook runs inside libvirtd's hook call and must not import libvirt, so this sits
outside ``migsec.virt``; lxml is imported on first use (the hook's lifecycle calls
never parse XML). Entity expansion, network access and DTDs are off, a DOCTYPE is
refused, and so is anything above ``max_size`` before parsing.
"""
from __future__ import annotations

from typing import Any

from migsec.errors import MigsecError


def parse_domain(data: bytes, *, max_size: int, error: type[MigsecError], where: str = "") -> Any:
    """The root ``<domain>`` element of ``data``; ``error`` names what is wrong.

    ``where`` (e.g. " on stdin") says in the messages where the XML came from.
    """
    return parse_untrusted(data, root="domain", what="domain XML", max_size=max_size,
                           error=error, where=where)


def parse_untrusted(data: bytes, *, root: str, what: str, max_size: int,
                    error: type[MigsecError], where: str = "") -> Any:
    """The root element of ``data``, which must be ``<root>``; the same rules as parse_domain.

    ``what`` names the document in messages (e.g. "migration cookie").
    """
    from lxml import etree

    if len(data) > max_size:
        raise error(f"{what} is {len(data)} bytes, above the {max_size}-byte limit")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             dtd_validation=False, huge_tree=False)
    try:
        elem = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise error(f"{what}{where} is not well-formed: {exc}") from exc
    info = elem.getroottree().docinfo
    if info.doctype or info.internalDTD is not None:
        raise error(f"{what}{where} carries a DOCTYPE/DTD; refused (entities are never expanded)")
    if elem.tag != root:
        raise error(f"expected a <{root}> document{where}, got <{elem.tag}>")
    return elem

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
    from lxml import etree

    if len(data) > max_size:
        raise error(f"domain XML is {len(data)} bytes, above the {max_size}-byte limit")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             dtd_validation=False, huge_tree=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise error(f"domain XML{where} is not well-formed: {exc}") from exc
    info = root.getroottree().docinfo
    if info.doctype or info.internalDTD is not None:
        raise error(f"domain XML{where} carries a DOCTYPE/DTD; refused (entities are never expanded)")
    if root.tag != "domain":
        raise error(f"expected a <domain> document{where}, got <{root.tag}>")
    return root

"""Domain life-cycle operations: suspend, resume, save, restore, define, undefine, destroy.

Optional flags are probed with ``getattr(libvirt, ...)`` and passed only when
asked for, so drivers that know none of them (the test driver) still work, and a
flag a driver refuses is an OperationUnsupportedError, never silently dropped.
"""
from __future__ import annotations

import uuid as uuidlib
from collections.abc import Mapping

import libvirt

from migsec.errors import SaveImageError
from migsec.handover import MOVED_NS, MOVED_PREFIX, MovedMark
from migsec.handover import moved_mark as handover_mark
from migsec.virt.connection import Connection, lookup
from migsec.virt.describe import DomainState, state_of
from migsec.virt.domxml import TAGS_NS, TAGS_PREFIX, parse_domain_xml, tags_element, view
from migsec.virt.errors import DomainStateError, DomainXmlError, OperationUnsupportedError, libvirt_call
from migsec.virt.rewrite import rewrite_domain_xml


def _flag(name: str) -> int:
    return getattr(libvirt, name, 0)


def _require_flag(name: str, what: str, uri: str) -> int:
    value = _flag(name)
    if not value:
        raise OperationUnsupportedError(f"{what}: libvirt-python here lacks {name} (talking to {uri})")
    return value


def domain_state(conn: Connection, name_or_uuid: str) -> DomainState:
    """The domain's state (running, paused, shutoff, ...)."""
    return state_of(lookup(conn, name_or_uuid), conn.uri)


def domain_xml(conn: Connection, name_or_uuid: str, *, inactive: bool = False, migratable: bool = False) -> str:
    """The domain's XML (live, or the persistent config with ``inactive``)."""
    dom = lookup(conn, name_or_uuid)
    flags = (_flag("VIR_DOMAIN_XML_INACTIVE") if inactive else 0) | (
        _flag("VIR_DOMAIN_XML_MIGRATABLE") if migratable else 0
    )
    with libvirt_call("get domain XML", uri=conn.uri, domain=name_or_uuid):
        return dom.XMLDesc(flags)


def _expect(dom: libvirt.virDomain, conn: Connection, action: str, allowed: set[DomainState]) -> None:
    state = state_of(dom, conn.uri)
    if state not in allowed:
        wanted = " or ".join(sorted(s.value for s in allowed))
        raise DomainStateError(f"{action}: domain '{dom.name()}' is {state.value}, needs to be {wanted}")


def suspend_domain(conn: Connection, name_or_uuid: str) -> None:
    """Pause a running domain's vCPUs."""
    dom = lookup(conn, name_or_uuid)
    _expect(dom, conn, "suspend", {DomainState.RUNNING, DomainState.BLOCKED})
    with libvirt_call("suspend", uri=conn.uri, domain=name_or_uuid):
        dom.suspend()


def resume_domain(conn: Connection, name_or_uuid: str) -> None:
    """Resume a paused domain."""
    dom = lookup(conn, name_or_uuid)
    _expect(dom, conn, "resume", {DomainState.PAUSED})
    with libvirt_call("resume", uri=conn.uri, domain=name_or_uuid):
        dom.resume()


def _describe_action(action: str, bypass_cache: bool, paused: bool | None, xml: bool = False) -> str:
    # Name the options in the message so "unsupported flags" says which one.
    opts = [o for o, on in (("bypass-cache", bypass_cache), ("paused", paused is True),
                            ("running", paused is False), ("replacement XML", xml)) if on]
    return f"{action} ({', '.join(opts)})" if opts else action


def _save_flags(bypass_cache: bool, paused: bool | None, what: str, uri: str) -> int:
    flags = 0
    if bypass_cache:
        flags |= _require_flag("VIR_DOMAIN_SAVE_BYPASS_CACHE", what, uri)
    if paused is True:
        flags |= _require_flag("VIR_DOMAIN_SAVE_PAUSED", what, uri)
    elif paused is False:
        flags |= _require_flag("VIR_DOMAIN_SAVE_RUNNING", what, uri)
    return flags


def save_domain(
    conn: Connection,
    name_or_uuid: str,
    path: str,
    *,
    bypass_cache: bool = False,
    paused: bool | None = None,
) -> None:
    """Save a running or paused domain's memory to ``path`` (on the libvirt host); it stops.

    ``paused``: True/False records that a restore should start it paused/running;
    None keeps the state it had. ``bypass_cache`` writes with O_DIRECT.
    """
    dom = lookup(conn, name_or_uuid)
    _expect(dom, conn, "save", {DomainState.RUNNING, DomainState.BLOCKED, DomainState.PAUSED})
    action = _describe_action("save", bypass_cache, paused)
    flags = _save_flags(bypass_cache, paused, action, conn.uri)
    with libvirt_call(action, uri=conn.uri, domain=name_or_uuid, path=path):
        if flags:
            dom.saveFlags(path, None, flags)
        else:
            dom.save(path)


def save_image_xml(conn: Connection, path: str) -> str:
    """The domain XML stored in a save image."""
    with libvirt_call("read save image", uri=conn.uri, path=path):
        return conn.raw.saveImageGetXMLDesc(path, 0)


def check_save_image(conn: Connection, path: str, *, uuid: str, name: str | None = None) -> str:
    """Check that the save image at ``path`` holds the domain ``uuid`` (and ``name``); return its XML.

    The image may come from a peer, so its XML is parsed as untrusted.
    """
    try:
        expected = uuidlib.UUID(uuid)
    except (ValueError, TypeError, AttributeError) as exc:
        raise SaveImageError(f"expected uuid {uuid!r} for save image '{path}' is not a uuid") from exc
    xml = save_image_xml(conn, path)
    try:
        v = view(parse_domain_xml(xml))
        found = uuidlib.UUID(v.uuid)
    except (DomainXmlError, ValueError) as exc:
        raise SaveImageError(f"save image '{path}' has unusable domain XML: {exc}") from exc
    if found != expected or (name is not None and v.name != name):
        want = f"'{name}' ({expected})" if name else str(expected)
        raise SaveImageError(
            f"save image '{path}' belongs to domain '{v.name}' ({found}), not {want}; refusing it"
        )
    return xml


def save_image_restore_xml(
    conn: Connection,
    path: str,
    *,
    uuid: str,
    disk_map: Mapping[str, str],
    network_map: Mapping[str, str] | None = None,
    bridge_map: Mapping[str, str] | None = None,
) -> str:
    """The save image's XML checked against ``uuid`` and rewritten for this host (for ``restore_domain``)."""
    xml = check_save_image(conn, path, uuid=uuid)
    return rewrite_domain_xml(xml, disk_map=disk_map, network_map=network_map, bridge_map=bridge_map)


def restore_name(xml: str) -> str:
    """The name ``restore_domain(conn, path, xml=xml)`` gives the domain (known before it runs)."""
    return view(parse_domain_xml(xml)).name


def restore_domain(
    conn: Connection,
    path: str,
    *,
    xml: str | None = None,
    paused: bool | None = None,
    bypass_cache: bool = False,
) -> str:
    """Restore a domain from a save image, optionally with a replacement XML; returns its name.

    ``paused``: True starts it paused (what a migration destination wants),
    False running, None as it was saved. The replacement XML must be
    ABI-compatible with the image (same devices); libvirt checks that.
    """
    # Refuse unsafe or malformed replacement XML before libvirt sees it.
    image_name = restore_name(xml) if xml is not None else None
    action = _describe_action("restore", bypass_cache, paused, xml is not None)
    flags = _save_flags(bypass_cache, paused, action, conn.uri)
    with libvirt_call(action, uri=conn.uri, domain=image_name, path=path):
        if flags or xml is not None:
            conn.raw.restoreFlags(path, xml, flags)
        else:
            conn.raw.restore(path)
    if image_name is None:
        image_name = view(parse_domain_xml(save_image_xml(conn, path))).name
    return image_name


def define_domain(conn: Connection, xml: str) -> str:
    """Define (persistently) a domain from XML; returns its name."""
    name = view(parse_domain_xml(xml)).name
    with libvirt_call("define", uri=conn.uri, domain=name):
        dom = conn.raw.defineXML(xml)
        return dom.name()


def undefine_domain(conn: Connection, name_or_uuid: str, *, keep_nvram: bool = False) -> None:
    """Remove a domain's persistent config, with its managed-save image, snapshot metadata and nvram."""
    dom = lookup(conn, name_or_uuid)
    with libvirt_call("undefine", uri=conn.uri, domain=name_or_uuid):
        flags = 0
        if dom.hasManagedSaveImage(0):
            flags |= _flag("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE")
        if dom.snapshotNum(0) > 0:
            flags |= _flag("VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA")
        if view(parse_domain_xml(dom.XMLDesc(_flag("VIR_DOMAIN_XML_INACTIVE")))).boot.nvram:
            flags |= _flag("VIR_DOMAIN_UNDEFINE_KEEP_NVRAM" if keep_nvram else "VIR_DOMAIN_UNDEFINE_NVRAM")
        if flags:
            dom.undefineFlags(flags)
        else:
            dom.undefine()


def destroy_domain(conn: Connection, name_or_uuid: str) -> None:
    """Stop a running or paused domain at once (pull the plug)."""
    dom = lookup(conn, name_or_uuid)
    _expect(
        dom,
        conn,
        "destroy",
        {DomainState.RUNNING, DomainState.BLOCKED, DomainState.PAUSED, DomainState.CRASHED,
         DomainState.PMSUSPENDED, DomainState.SHUTDOWN},
    )
    with libvirt_call("destroy", uri=conn.uri, domain=name_or_uuid):
        dom.destroy()


def start_domain(conn: Connection, name_or_uuid: str, *, paused: bool = False) -> None:
    """Start a defined, shut-off domain."""
    dom = lookup(conn, name_or_uuid)
    _expect(dom, conn, "start", {DomainState.SHUTOFF})
    with libvirt_call("start", uri=conn.uri, domain=name_or_uuid):
        dom.createWithFlags(_flag("VIR_DOMAIN_START_PAUSED") if paused else 0)


def set_tags(conn: Connection, name_or_uuid: str, tags: list[str] | tuple[str, ...]) -> None:
    """Store migsec tags in the domain's ``<metadata>`` (live and persistent config as applicable)."""
    dom = lookup(conn, name_or_uuid)
    element = tags_element(tags)
    with libvirt_call("set tags", uri=conn.uri, domain=name_or_uuid):
        flags = 0
        if dom.isActive():
            flags |= _flag("VIR_DOMAIN_AFFECT_LIVE")
        if dom.isPersistent():
            flags |= _flag("VIR_DOMAIN_AFFECT_CONFIG")
        dom.setMetadata(_flag("VIR_DOMAIN_METADATA_ELEMENT"), element, TAGS_PREFIX, TAGS_NS, flags)


def mark_moved(conn: Connection, name_or_uuid: str, mark: MovedMark) -> None:
    """Mark the kept persistent definition as given away (``migsec.handover``): the hook then
    refuses to start it. Only the persistent config is marked; the domain must be defined."""
    dom = lookup(conn, name_or_uuid)
    with libvirt_call("mark as moved", uri=conn.uri, domain=name_or_uuid):
        if not dom.isPersistent():
            raise DomainStateError(f"domain '{name_or_uuid}' has no persistent definition to mark")
        dom.setMetadata(_flag("VIR_DOMAIN_METADATA_ELEMENT"), mark.element(), MOVED_PREFIX, MOVED_NS,
                        _flag("VIR_DOMAIN_AFFECT_CONFIG"))


def moved_mark(conn: Connection, name_or_uuid: str) -> MovedMark | None:
    """The given-away mark on the domain's persistent definition, if it has one."""
    dom = lookup(conn, name_or_uuid)
    with libvirt_call("read the moved mark", uri=conn.uri, domain=name_or_uuid):
        if not dom.isPersistent():
            return None
        xml = dom.XMLDesc(_flag("VIR_DOMAIN_XML_INACTIVE"))
    return handover_mark(xml, error=DomainXmlError)


def clear_moved(conn: Connection, name_or_uuid: str) -> MovedMark | None:
    """Remove the given-away mark (``migsec release``, or the guest came back); returns it."""
    mark = moved_mark(conn, name_or_uuid)
    if mark is None:
        return None
    dom = lookup(conn, name_or_uuid)
    with libvirt_call("clear the moved mark", uri=conn.uri, domain=name_or_uuid):
        dom.setMetadata(_flag("VIR_DOMAIN_METADATA_ELEMENT"), None, None, MOVED_NS,
                        _flag("VIR_DOMAIN_AFFECT_CONFIG"))
    return mark


__all__ = [
    "check_save_image",
    "clear_moved",
    "mark_moved",
    "moved_mark",
    "define_domain",
    "destroy_domain",
    "domain_state",
    "domain_xml",
    "restore_domain",
    "restore_name",
    "resume_domain",
    "save_domain",
    "save_image_restore_xml",
    "save_image_xml",
    "set_tags",
    "start_domain",
    "suspend_domain",
    "undefine_domain",
]

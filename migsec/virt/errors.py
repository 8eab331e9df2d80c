"""libvirt errors sorted by error code into migsec's VirtError tree (as virtinst does).

``translate`` is the one place that turns a ``libvirt.libvirtError`` into a
migsec exception; every call into libvirt in this package goes through
``libvirt_call``, so no libvirt exception leaks out of ``migsec.virt``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import libvirt

from migsec.errors import (
    DomainNotFoundError,
    HypervisorUnavailableError,
    SaveImageError,
    VirtError,
)


class DomainStateError(VirtError):
    """The domain is not in a state that allows the operation (e.g. resume of a running domain)."""


class DomainExistsError(VirtError):
    """A domain with that name or uuid already exists."""


class DomainXmlError(VirtError):
    """Domain XML is malformed, unsafe, or rejected by libvirt (including ABI mismatches)."""


class OperationUnsupportedError(VirtError):
    """The hypervisor driver does not support the operation or one of its flags."""


class DiskImageError(VirtError):
    """A disk image could not be inspected (qemu-img failed or gave unusable output)."""


def _code(name: str) -> int:
    # Probe constants so older bindings without a code still import.
    return getattr(libvirt, name, -1)


_NOT_FOUND = {_code("VIR_ERR_NO_DOMAIN")}
_STATE = {_code("VIR_ERR_OPERATION_INVALID")}
_XML = {
    _code("VIR_ERR_XML_ERROR"),
    _code("VIR_ERR_XML_DETAIL"),
    _code("VIR_ERR_XML_INVALID_SCHEMA"),
    _code("VIR_ERR_CONFIG_UNSUPPORTED"),
    _code("VIR_ERR_INVALID_DOMAIN"),
}
_UNSUPPORTED = {
    _code("VIR_ERR_NO_SUPPORT"),
    _code("VIR_ERR_ARGUMENT_UNSUPPORTED"),
    _code("VIR_ERR_OPERATION_UNSUPPORTED"),
}
_EXISTS = {_code("VIR_ERR_DOM_EXIST")}
_CONNECTION = {
    _code("VIR_ERR_NO_CONNECT"),
    _code("VIR_ERR_INVALID_CONN"),
    _code("VIR_ERR_AUTH_FAILED"),
    _code("VIR_ERR_AUTH_CANCELLED"),
    _code("VIR_ERR_AUTH_UNAVAILABLE"),
    _code("VIR_ERR_RPC"),
}
_CONNECTION_DOMAINS = {_code("VIR_FROM_RPC"), _code("VIR_FROM_REMOTE")}
_FILE_CODES = {_code("VIR_ERR_SYSTEM_ERROR"), _code("VIR_ERR_INTERNAL_ERROR"), _code("VIR_ERR_OPERATION_FAILED")}


def translate(
    exc: libvirt.libvirtError,
    *,
    action: str,
    uri: str,
    domain: str | None = None,
    path: str | None = None,
) -> VirtError:
    """Return the migsec exception for a libvirt error raised while doing ``action``.

    ``domain`` and ``path`` name what the user asked about, so the message says
    which domain or save image is concerned. ``path`` marks save-image
    operations: file-level failures then become ``SaveImageError``.
    """
    code = exc.get_error_code()
    err_domain = exc.get_error_domain()
    detail = exc.get_error_message() or str(exc)
    subject = f"domain '{domain}'" if domain else "libvirt"
    where = f" on {uri}"

    if code in _NOT_FOUND:
        return DomainNotFoundError(
            f"{action}: no domain '{domain}'{where} (see `virsh -c {uri} list --all`)"
            if domain
            else f"{action}: domain not found{where}: {detail}"
        )
    if code in _CONNECTION or (err_domain in _CONNECTION_DOMAINS and code == _code("VIR_ERR_SYSTEM_ERROR")):
        return HypervisorUnavailableError(
            f"{action}: cannot talk to libvirt at {uri}: {detail} "
            "(is libvirtd running and is the socket path right?)"
        )
    if code in _STATE:
        return DomainStateError(f"{action}: {subject}{where} is not in a suitable state: {detail}")
    if code in _EXISTS or (code == _code("VIR_ERR_OPERATION_FAILED") and "already exists" in detail):
        return DomainExistsError(f"{action}: {detail}{where}")
    if code in _UNSUPPORTED or (code == _code("VIR_ERR_INVALID_ARG") and "unsupported flags" in detail):
        return OperationUnsupportedError(
            f"{action}: the libvirt driver at {uri} does not support this for {subject}: {detail}"
        )
    if code in _XML:
        return DomainXmlError(f"{action}: XML for {subject} rejected{where}: {detail}")
    if path is not None and code in _FILE_CODES:
        return SaveImageError(f"{action}: save image '{path}'{where}: {detail}")
    return VirtError(f"{action}: {subject}{where}: {detail} (libvirt error code {code})")


@contextlib.contextmanager
def libvirt_call(
    action: str, *, uri: str, domain: str | None = None, path: str | None = None
) -> Iterator[None]:
    """Run a block of libvirt calls, translating any libvirt error."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate(exc, action=action, uri=uri, domain=domain, path=path) from exc

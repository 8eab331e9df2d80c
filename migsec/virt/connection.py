"""Opening and closing libvirt connections, and looking domains up."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

import libvirt

from migsec.errors import DomainNotFoundError, HypervisorUnavailableError
from migsec.virt.errors import libvirt_call

DEFAULT_URI = "qemu:///system"

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")
_handler_lock = threading.Lock()
_handler_installed = False
_event_loop_started = False


def _silence_default_handler() -> None:
    # libvirt prints every error to stderr by default; we raise them instead.
    global _handler_installed
    with _handler_lock:
        if not _handler_installed:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _handler_installed = True


def _ensure_event_loop() -> None:
    # The embedded QEMU driver (qemu:///embed?root=DIR) runs inside this process and
    # needs libvirt's event loop to watch its QEMU monitors; one daemon thread serves all.
    global _event_loop_started
    with _handler_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


@dataclass(frozen=True)
class HostCapacity:
    """What a host offers new domains (for the destination's capacity check)."""

    cpus: int
    memory_bytes: int
    free_memory_bytes: int


class Connection:
    """An open libvirt connection. Close it (or use ``with``) when done."""

    def __init__(self, raw: libvirt.virConnect, uri: str, *, local_files: bool | None = None) -> None:
        self._raw: libvirt.virConnect | None = raw
        self.uri = uri
        # Whether paths in this libvirt's domain XML name files this process can read.
        self.local_files = _same_filesystem(uri) if local_files is None else local_files

    @property
    def raw(self) -> libvirt.virConnect:
        """The libvirt handle, for use inside ``migsec.virt`` only."""
        if self._raw is None:
            raise HypervisorUnavailableError(f"connection to {self.uri} is closed")
        return self._raw

    @property
    def closed(self) -> bool:
        return self._raw is None

    @property
    def hostname(self) -> str:
        with libvirt_call("get host name", uri=self.uri):
            return self.raw.getHostname()

    @property
    def driver(self) -> str:
        """The hypervisor driver name, e.g. ``QEMU`` or ``TEST``."""
        with libvirt_call("get driver type", uri=self.uri):
            return self.raw.getType()

    def capacity(self) -> HostCapacity:
        """CPUs, memory and free memory of the host."""
        with libvirt_call("get host capacity", uri=self.uri):
            info = self.raw.getInfo()
            free = self.raw.getFreeMemory()
        return HostCapacity(cpus=int(info[2]), memory_bytes=int(info[1]) * 1024 * 1024, free_memory_bytes=int(free))

    def list_domains(self) -> list[str]:
        """Names of all domains, active and inactive, sorted."""
        with libvirt_call("list domains", uri=self.uri):
            return sorted(d.name() for d in self.raw.listAllDomains(0))

    def close(self) -> None:
        """Close the connection; calling it twice is harmless."""
        raw, self._raw = self._raw, None
        if raw is not None:
            with libvirt_call("close connection", uri=self.uri):
                raw.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Connection {self.uri} {state}>"


def _same_filesystem(uri: str) -> bool:
    # A remote host, or a socket into another mount namespace (the lab), may hold a
    # different file under the same path; qemu-img must not inspect ours instead.
    parsed = urlsplit(uri)
    return not parsed.netloc and "+" not in parsed.scheme and "socket=" not in parsed.query


def connect(uri: str = DEFAULT_URI, *, readonly: bool = False, local_files: bool | None = None) -> Connection:
    """Open a libvirt connection to ``uri`` (any libvirt URI, e.g. a lab host's socket).

    ``qemu:///embed?root=DIR`` runs libvirt's QEMU driver in this process (no daemon).
    ``local_files``: whether disk paths of this libvirt are files this process sees
    (so qemu-img may inspect them); by default true only for plain local URIs.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise HypervisorUnavailableError(f"invalid libvirt URI {uri!r}: expected e.g. qemu:///system")
    _silence_default_handler()
    if "///embed" in uri:
        _ensure_event_loop()
    with libvirt_call("connect", uri=uri):
        raw = libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
    if raw is None:  # very old bindings returned None instead of raising
        raise HypervisorUnavailableError(f"connect: cannot open libvirt at {uri}")
    return Connection(raw, uri, local_files=local_files)


def warm_capabilities(uri: str = DEFAULT_URI) -> float:
    """Ask libvirt for the host's and the default domain capabilities; returns the seconds taken.

    libvirtd probes each QEMU binary (seconds) the first time anything needs its
    capabilities and caches the result; asking early keeps that probe off the
    critical path of the first incoming restore.
    """
    import time

    started = time.monotonic()
    with connect(uri) as conn:
        with libvirt_call("get capabilities", uri=uri):
            conn.raw.getCapabilities()
        with libvirt_call("get domain capabilities", uri=uri):
            try:
                conn.raw.getDomainCapabilities(None, None, None, None, 0)
            except libvirt.libvirtError as exc:
                # drivers without domain capabilities (test:///) have nothing more to warm
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
    return time.monotonic() - started


def lookup(conn: Connection, name_or_uuid: str) -> libvirt.virDomain:
    """The libvirt domain with that name or uuid; DomainNotFoundError names it otherwise."""
    if not isinstance(name_or_uuid, str) or not name_or_uuid:
        raise DomainNotFoundError(f"invalid domain name {name_or_uuid!r}")
    with libvirt_call("look up domain", uri=conn.uri, domain=name_or_uuid):
        if _UUID_RE.match(name_or_uuid):
            try:
                return conn.raw.lookupByUUIDString(name_or_uuid)
            except libvirt.libvirtError as exc:
                # A name may look like a uuid; fall through to the name only when not found.
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return conn.raw.lookupByName(name_or_uuid)

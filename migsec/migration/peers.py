"""Finding a peer domain by the address an administrator typed."""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from migsec.errors import ConfigError
from migsec.pki.peers import DEFAULT_PORT

if TYPE_CHECKING:
    from migsec.daemon.services import Services
    from migsec.pki import Peer


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return set()


def split_address(address: str) -> tuple[str, int]:
    """``migsec://host:port`` (or ``host:port``) -> (host, port)."""
    raw = address if "://" in address else f"migsec://{address}"
    parts = urlsplit(raw)
    if not parts.hostname:
        raise ConfigError(f"peer address {address!r} has no host")
    return parts.hostname, parts.port or DEFAULT_PORT


def find_peer(services: Services, host: str, port: int) -> Peer:
    """The peer whose DID is ``host`` or whose directory address is ``host:port``."""
    peers = services.peers.list()
    for peer in peers:
        if peer.did == host:
            return peer
    wanted = _addresses(host)
    for peer in peers:
        p_host, p_port = split_address(peer.address)
        if p_port == port and (p_host == host or _addresses(p_host) & wanted):
            return peer
    raise ConfigError(f"no peer domain at {host}:{port} in the peer directory "
                      f"(add it with `migsec peer add DID --address {host}:{port} --cert FILE`)")

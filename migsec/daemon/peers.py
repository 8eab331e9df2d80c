"""Finding a peer domain by the address an administrator typed."""
from __future__ import annotations

import socket
from typing import Any

from migsec.errors import ConfigError


def _addresses(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return set()


def find_peer(services: Any, host: str, port: int) -> Any:
    """The peer whose DID is ``host`` or whose directory address is ``host:port``."""
    peers = services.peers.list()
    for peer in peers:
        if peer.did == host:
            return peer
    wanted = _addresses(host)
    for peer in peers:
        p_host, _, p_port = str(peer.address).rpartition(":")
        p_host = p_host.strip("[]")
        if int(p_port or 0) == port and (p_host == host or _addresses(p_host) & wanted):
            return peer
    raise ConfigError(f"no peer domain at {host}:{port} in the peer directory "
                      f"(add it with `migsec peer add DID --address {host}:{port} --cert FILE`)")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = str(address).rpartition(":")
    return host.strip("[]"), int(port)

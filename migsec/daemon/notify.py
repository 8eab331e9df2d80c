"""systemd readiness notification (sd_notify) without a dependency.

systemd hands the daemon a unix datagram socket in ``NOTIFY_SOCKET``; a
leading ``@`` means the abstract namespace. Outside systemd this is a no-op.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def sd_notify(state: str, *, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; return whether it was sent."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        # systemd going away must not take the daemon down with it
        log.warning("sd_notify %s failed: %s", state.split("=")[0], exc)
        return False
    return True

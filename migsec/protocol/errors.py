"""Finer protocol errors, each below a class of :mod:`migsec.errors`."""
from __future__ import annotations

from migsec.errors import HandshakeError, ProtocolError, UnexpectedMessageError


class ReflectionError(UnexpectedMessageError):
    """A message of our own role (or from our own domain) came back to us."""


class KeyBindingError(HandshakeError):
    """A signed handshake body does not verify under the presented certificate.

    This is what a substituted ephemeral key (eA / eB) or a re-signed body looks like.
    """


class ReplayCacheFullError(ProtocolError):
    """The replay cache is full of unexpired entries; refusing rather than forgetting one."""


class RpcFilterError(ProtocolError):
    """A libvirt RPC packet through the migration proxy is malformed, oversize or illegal.

    The filter that raised it is in a terminal error state: the connection must be closed.
    (A well-formed call that is merely not allowed is not an error: it is refused with an
    RPC error reply and reported as a ``Refused`` event.)
    """

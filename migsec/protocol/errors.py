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

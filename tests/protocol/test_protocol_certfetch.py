"""The first-contact certificate fetch frames (CertRequest / CertReply), sans-IO."""
from __future__ import annotations

import pytest

from migsec.errors import MalformedMessageError, UnexpectedMessageError
from migsec.protocol.framing import CERT_REPLY, CERT_REQUEST, MIG_RESP, FrameDecoder
from migsec.protocol.handshake import certificate_reply, certificate_request, parse_certificate_reply

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _frame(data: bytes):
    decoder = FrameDecoder()
    decoder.receive_data(data)
    return decoder.next_frame()


def test_request_and_reply_round_trip():
    assert _frame(certificate_request()).type == CERT_REQUEST
    frame = _frame(certificate_reply(PEM))
    assert frame.type == CERT_REPLY and parse_certificate_reply(frame.type, frame.payload) == PEM


@pytest.mark.parametrize("payload", [b"", b"[]", b'{"v":2,"cert":"x"}', b'{"v":1}', b'{"v":1,"cert":"no pem"}',
                                     b'{"v":1,"cert":"-----BEGIN CERTIFICATE-----\\u00e9"}', b"\xff"])
def test_malformed_replies_are_refused(payload):
    with pytest.raises(MalformedMessageError):
        parse_certificate_reply(CERT_REPLY, payload)


def test_another_frame_instead_of_a_reply_is_refused():
    with pytest.raises(UnexpectedMessageError):
        parse_certificate_reply(MIG_RESP, certificate_reply(PEM)[5:])

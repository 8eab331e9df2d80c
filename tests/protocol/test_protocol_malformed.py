"""Hand-written hostile inputs (tests/data/protocol/malformed.json), each refused with a message
that names the problem."""
import json
from pathlib import Path

import pytest

from migsec.errors import MalformedMessageError
from migsec.protocol.codec import parse_json_object
from migsec.protocol.commit import Receipt
from migsec.protocol.local import AuthReply, AuthRequest, LocalMigrationRequest
from migsec.protocol.messages import AuthorizationTicket, MigrationRequest

CASES = json.loads((Path(__file__).parents[1] / "data" / "protocol" / "malformed.json").read_text())["cases"]
DECODERS = {
    "AuthRequest": AuthRequest.decode,
    "AuthReply": AuthReply.decode,
    "LocalMigrationRequest": LocalMigrationRequest.decode,
    "MigrationRequest": lambda text: MigrationRequest.from_claims(parse_json_object(text, "request")),
    "AuthorizationTicket": AuthorizationTicket.peek,
    "Receipt": Receipt.peek,
}


@pytest.mark.parametrize("case", CASES, ids=[f"{c['decoder']}-{i}" for i, c in enumerate(CASES)])
def test_malformed_input_is_refused_with_a_clear_message(case):
    with pytest.raises(MalformedMessageError) as info:
        DECODERS[case["decoder"]](case["input"])
    assert case["error"] in str(info.value)

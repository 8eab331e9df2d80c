"""migsec.canonical: the fixed byte forms that protocol digests and ledger hashes cover."""
from __future__ import annotations

import math

import pytest

from migsec.audit import canonical_json as ledger_form
from migsec.canonical import canonical_json
from migsec.errors import MalformedMessageError
from migsec.protocol.codec import canonical_json as protocol_form

VALUE = {"vm": "café", "a": [1, 2.5, None, True], "n": {"z": 1, "y": "x y"}}


def test_known_forms():
    # sorted keys at every level, no whitespace; UTF-8 for the protocol, escapes for the ledger
    assert protocol_form(VALUE) == canonical_json(VALUE) == \
        '{"a":[1,2.5,null,true],"n":{"y":"x y","z":1},"vm":"café"}'.encode("utf-8")
    assert ledger_form(VALUE) == canonical_json(VALUE, ascii=True) == \
        b'{"a":[1,2.5,null,true],"n":{"y":"x y","z":1},"vm":"caf\\u00e9"}'


@pytest.mark.parametrize("bad", [{"x": math.nan}, {"x": math.inf}, {"x": object()}, {1j: 1}])
def test_not_plain_json_is_refused(bad):
    with pytest.raises((TypeError, ValueError)):
        canonical_json(bad)
    with pytest.raises((TypeError, ValueError)):
        ledger_form(bad)
    with pytest.raises(MalformedMessageError):
        protocol_form(bad)


def test_strict_decoding_hooks():
    import json

    from migsec.canonical import no_constant, no_duplicates

    def strict(text):
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)

    assert strict('{"a":{"b":1},"c":2}') == {"a": {"b": 1}, "c": 2}
    with pytest.raises(MalformedMessageError, match="duplicate JSON member 'b'"):
        strict('{"a":{"b":1,"b":2}}')
    with pytest.raises(MalformedMessageError, match="NaN"):
        strict('{"a":NaN}')

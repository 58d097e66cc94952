"""The proto's JSON mapping writes 64-bit integers as strings (a GenerateResponse's "seed": "42"),
and its parsers take a number or a decimal string for every integer field: a request that echoes
a response's seed back parses to the same request. Anything else stays refused, naming its field."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from sdserve.api.convert import pb_from_dict
from sdserve.errors import InvalidArgument
from sdserve.protos.sdserve.v1 import sdserve_pb2 as pb


def test_a_responses_seed_string_parses_as_the_number():
    response = json_format.MessageToDict(pb.GenerateResponse(seed=2**40 + 7), preserving_proto_field_name=True)
    assert response["seed"] == str(2**40 + 7)  # the mapping's own form, not a choice of ours
    as_string = pb_from_dict({"prompt": "a red circle", "seed": response["seed"], "steps": "4"})
    as_number = pb_from_dict({"prompt": "a red circle", "seed": 2**40 + 7, "steps": 4})
    assert as_string == as_number


@pytest.mark.parametrize("field,value,message", [
    ("seed", "4.2", "must be an integer"),
    ("seed", " 42", "must be an integer"),
    ("steps", "many", "must be an integer"),
    ("steps", "99999999999", "out of range"),
])
def test_other_strings_are_refused_naming_the_field(field, value, message):
    with pytest.raises(InvalidArgument) as info:
        pb_from_dict({"prompt": "a red circle", field: value})
    assert info.value.field == field and message in str(info.value)

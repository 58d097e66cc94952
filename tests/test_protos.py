"""The proto is the schema: stubs up to date, every field commented, flags follow field names."""

from __future__ import annotations

import re
from pathlib import Path

from sdserve.cli.main import build_parser
from sdserve.engine.request import spec_field_names
from sdserve.protos import generate
from sdserve.protos.sdserve.v1 import sdserve_pb2 as pb
from sdserve.server.convert import PROTO_FILE, request_fields


def test_generated_stubs_are_up_to_date(tmp_path: Path):
    generate.generate(tmp_path)
    for fresh in (tmp_path / "sdserve" / "v1").glob("*.py"):
        committed = generate.PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), f"run `make protos`: {fresh.name} is stale"


def test_every_field_has_a_comment():
    text = PROTO_FILE.read_text()
    for line_no, line in enumerate(text.splitlines()):
        if re.match(r"\s+(optional |repeated )?[\w.]+ \w+ = \d+;", line):
            previous = text.splitlines()[line_no - 1].strip()
            assert previous.startswith("//"), f"field without a comment: {line.strip()}"
    assert all(f.comment for f in request_fields())


def test_request_spec_mirrors_the_proto():
    proto_fields = [f.name for f in pb.GenerateRequest.DESCRIPTOR.fields]
    assert spec_field_names() == proto_fields[: len(spec_field_names())]


def test_cli_flags_are_field_names_with_dashes():
    parser = build_parser()
    generate_parser = parser._subparsers._group_actions[0].choices["generate"]
    flags = {opt for action in generate_parser._actions for opt in action.option_strings}
    for field in request_fields():
        assert "--" + field.name.replace("_", "-") in flags
    assert "--guidance" in flags

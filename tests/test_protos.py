"""The proto is the schema: stubs up to date, every field commented, flags follow field names."""

from __future__ import annotations

from pathlib import Path

from sdserve.api.convert import field_comments, request_fields
from sdserve.api.types import spec_field_names
from sdserve.cli.main import build_parser
from sdserve.protos import generate
from sdserve.protos.sdserve.v1 import sdserve_pb2 as pb


def test_generated_stubs_are_up_to_date(tmp_path: Path):
    generate.generate(tmp_path)
    fresh_files = [*(tmp_path / "sdserve" / "v1").glob("*.py"), tmp_path / "sdserve" / "v1" / "sdserve.binpb"]
    for fresh in fresh_files:
        committed = generate.PROTO_DIR / fresh.name
        assert committed.read_bytes() == fresh.read_bytes(), f"run `make protos`: {fresh.name} is stale"


def test_every_field_has_a_comment():
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        comments = field_comments(message.name)
        for field in message.fields:
            assert comments.get(field.name), f"field without a comment: {message.name}.{field.name}"
    assert all(f.comment for f in request_fields())
    assert field_comments("GenerateRequest")["prompt"].startswith("What to draw.")


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

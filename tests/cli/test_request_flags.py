"""`sdserve generate` and `sdserve client generate` take the same request flags, from one table.

The oracle is the proto's descriptor: every field of GenerateRequest, and every field of the
messages it holds (`controlnets.scale`, `outpaint.left`, ...), must be filled by some flag of both
commands, except the documented `request_flags.EXCLUDED` (paths vs registered names). A field
added to the proto without a flag fails here.
"""

from __future__ import annotations

import argparse
import io

import pytest
from google.protobuf.descriptor import FieldDescriptor
from PIL import Image

from sdserve.api.convert import pb_from_dict
from sdserve.cli import request_flags
from sdserve.cli.main import build_parser
from sdserve.cli.request_flags import EXCLUDED, FLAGS, Refs
from sdserve.protos.sdserve.v1 import sdserve_pb2 as pb

SCALAR_EXAMPLES = {int: "3", float: "0.5", str: "x", bool: None}


def _field_paths(descriptor, prefix: str = "") -> set[str]:
    paths = set()
    for field in descriptor.fields:
        path = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            paths |= _field_paths(field.message_type, f"{path}.")
        else:
            paths.add(path)
    return paths


def _filled_paths(value, prefix: str) -> set[str]:
    if isinstance(value, list):
        return set().union(*(_filled_paths(item, prefix) for item in value)) if value else set()
    if isinstance(value, dict):
        return set().union(*(_filled_paths(v, f"{prefix}{k}.") for k, v in value.items()))
    return {prefix.rstrip(".")}


def _command_parser(refs: Refs) -> argparse.ArgumentParser:
    command = "generate" if refs is Refs.PATHS else "client"
    parser = build_parser(command)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command_parser = subparsers.choices[command]
    if refs is Refs.NAMES:
        actions = next(a for a in command_parser._actions if isinstance(a, argparse._SubParsersAction))
        command_parser = actions.choices["generate"]
        command_parser._add_deferred()  # the client adds its request flags when first parsed
    return command_parser


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("flags") / "in.png"
    Image.new("RGB", (16, 16), (200, 30, 40)).save(path)
    return path


def _every_flag(refs: Refs, image_file) -> list[str]:
    from sdserve.api.convert import request_fields

    argv = []
    for field in request_fields():
        example = SCALAR_EXAMPLES[field.python_type]
        assert example is not None, f"no example for a {field.python_type.__name__} field: add one"
        argv += [f"--{field.name.replace('_', '-')}", example]
    for entry in FLAGS:
        argv += [entry.flags[0], entry.example[refs].format(file=image_file)]
    return argv


@pytest.mark.parametrize("refs", list(Refs), ids=lambda r: r.value)
def test_every_proto_field_has_a_flag_in_both_commands(refs, image_file):
    parser = _command_parser(refs)
    args, unknown = parser.parse_known_args(_every_flag(refs, image_file))
    assert not unknown
    values = request_flags.request_values(args, refs)
    filled = _filled_paths(values, "")
    wanted = _field_paths(pb.GenerateRequest.DESCRIPTOR)
    missing = wanted - filled - EXCLUDED[refs]
    assert not missing, f"GenerateRequest fields with no {refs.value} flag: {sorted(missing)}"
    assert not (EXCLUDED[refs] & filled)  # an exclusion that a flag fills is stale
    pb_from_dict(values)  # and the schema takes what the flags give (images as raw bytes)


def test_both_commands_register_the_same_request_flags():
    def request_options(parser):
        return {option for action in parser._actions for option in action.option_strings
                if action.container.title and action.container.title != "options"
                and action.container.title.startswith(("request fields", "adapters and image"))}

    in_process = request_options(_command_parser(Refs.PATHS))
    client = request_options(_command_parser(Refs.NAMES))
    assert in_process == client and "--controlnet" in client and "--clip-skip" in client


def test_a_new_proto_field_without_a_flag_is_caught(image_file, monkeypatch):
    # The check above can fail: drop one table entry and the walk names its fields.
    monkeypatch.setattr(request_flags, "FLAGS", tuple(e for e in FLAGS if e.flags[0] != "--outpaint"))
    monkeypatch.setattr(request_flags, "_BUILDERS", {k: v for k, v in request_flags._BUILDERS.items() if k != "outpaint"})
    parser = argparse.ArgumentParser()
    request_flags.add_request_flags(parser, Refs.NAMES)
    args, _ = parser.parse_known_args(_every_flag(Refs.NAMES, image_file))
    filled = _filled_paths(request_flags.request_values(args, Refs.NAMES), "")
    missing = _field_paths(pb.GenerateRequest.DESCRIPTOR) - filled - EXCLUDED[Refs.NAMES]
    assert missing == {"outpaint.left", "outpaint.top", "outpaint.right", "outpaint.bottom"}


def test_flag_values_become_the_same_request_in_both_modes(image_file):
    argv = ["--prompt", "p", "--controlnet", f"edges:{image_file}:0.8", "--control-preprocess", "canny",
            "--embedding", "tok-file:<t>", "--hypernetwork", "h:0.5", "--outpaint", "8,0,8,0",
            "--lora", "s:0.5:0.1"]
    values = {}
    for refs in Refs:
        args, _ = _command_parser(refs).parse_known_args(argv)
        values[refs] = request_flags.request_values(args, refs)
    names, paths = values[Refs.NAMES], values[Refs.PATHS]
    assert names["controlnets"] == paths["controlnets"] == [
        {"model": "edges", "image": image_file.read_bytes(), "scale": 0.8, "preprocess": "canny"}]
    assert names["embeddings"] == [{"name": "tok-file", "token": "<t>"}]
    assert paths["embeddings"] == [{"path": "tok-file", "token": "<t>"}]
    assert names["hypernetworks"] == [{"name": "h", "strength": 0.5}]
    assert names["adapters"] == [{"name": "s", "scale": 0.5, "start": 0.1}]
    assert paths["adapters"] == [{"path": "s", "scale": 0.5, "start": 0.1}]
    assert names["outpaint"] == {"left": 8, "top": 0, "right": 8, "bottom": 0}


def test_python_client_takes_bytes_paths_and_pil_images(image_file):
    from sdserve.api.client import Client

    data = image_file.read_bytes()
    pil = Image.open(image_file)
    expected_pil = io.BytesIO()
    pil.save(expected_pil, format="PNG")
    for given, want in ((data, data), (image_file, data), (pil, expected_pil.getvalue())):
        message = Client._request({"prompt": "p", "init_image": given,
                                   "controlnets": [{"model": "edges", "image": given}]})
        assert message.init_image == want and message.controlnets[0].image == want


def test_bad_flag_values_are_one_line_and_exit_2(capsys):
    for argv, needle in ((["--outpaint", "1,2"], "--outpaint: give four integers"),
                         (["--controlnet", "justone"], "--controlnet 'justone': expected MODEL:IMAGE"),
                         (["--control-preprocess", "canny"], "--control-preprocess needs a --controlnet"),
                         (["--init-image", "/nonexistent/x.png"], "--init-image: cannot read x.png")):
        args, _ = _command_parser(Refs.NAMES).parse_known_args(["--prompt", "p", *argv])
        with pytest.raises(SystemExit) as info:
            request_flags.request_values(args, Refs.NAMES)
        err = capsys.readouterr().err
        assert info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err

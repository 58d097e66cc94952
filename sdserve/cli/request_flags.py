"""The request flags of `sdserve generate` and `sdserve client generate`: one table, one parser.

Both commands register their request flags from here and turn the parsed flags into one request
dict (GenerateRequest's field names, the JSON form, image fields as raw bytes) with `request_values`,
so the two cannot drift (ARCHITECTURE rule 1). Scalar fields come from the proto's descriptor
(`--name-with-dashes`, plus `SHORTHANDS`); message and bytes fields have an entry of `FLAGS` each.
What differs between the commands is what names an adapter or a conditioning model (`Refs`): the
in-process engine reads files and directories, a server resolves registered names.

`tests/cli/test_request_flags.py` walks the proto's fields and fails when one has no flag in both
commands (`EXCLUDED` lists the documented exceptions).

No module-level imports beyond the standard library: `sdserve client --help` stays fast.
"""

from __future__ import annotations

import argparse
import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdserve.cli.common import fail

SHORTHANDS = {"guidance_scale": ["--guidance"]}


class Refs(enum.Enum):
    """What an adapter, embedding, hypernetwork, ControlNet or IP-Adapter flag names."""

    PATHS = "paths"  # `sdserve generate`: local files and directories
    NAMES = "names"  # `sdserve client generate`: names registered on the server


# Proto fields no flag fills, by mode, and why: a server refuses paths (clients name what was
# uploaded or registered), and the in-process engine has no registry to look names up in.
EXCLUDED: dict[Refs, frozenset[str]] = {
    Refs.PATHS: frozenset({"adapters.name", "embeddings.name", "hypernetworks.name"}),
    Refs.NAMES: frozenset({"adapters.path", "embeddings.path", "hypernetworks.path"}),
}


@dataclass(frozen=True)
class RequestFlag:
    """One flag filling a message or bytes field of GenerateRequest."""

    field: str  # the GenerateRequest field it fills
    flags: tuple[str, ...]
    metavar: dict[Refs, str]
    help: str
    repeat: bool  # append: one entry of a repeated field per flag
    # for tests/cli/test_request_flags.py: a value for the flag in each mode ({file}: a local file)
    example: dict[Refs, str]


def _both(value: str) -> dict[Refs, str]:
    return {Refs.PATHS: value, Refs.NAMES: value}


FLAGS: tuple[RequestFlag, ...] = (
    RequestFlag("adapters", ("--lora", "--adapter"),
                {Refs.PATHS: "PATH[:SCALE[:START[:END]]]", Refs.NAMES: "NAME[:SCALE[:START[:END]]]"},
                "an entry of the adapter stack (LoRA, LyCORIS, Concept Slider; repeatable): a safetensors file "
                "in-process, a registered name for a server; scale 1, start 0, end 1 by default", True,
                {Refs.PATHS: "{file}:0.5:0.1:0.9", Refs.NAMES: "style:0.5:0.1:0.9"}),
    RequestFlag("init_image", ("--init-image",), _both("FILE"),
                "PNG/JPEG for image-to-image or inpainting", False, _both("{file}")),
    RequestFlag("mask", ("--mask",), _both("FILE"), "inpainting mask (white repaints)", False, _both("{file}")),
    RequestFlag("outpaint", ("--outpaint",), _both("L,T,R,B"),
                "grow the init image by these margins (pixels) and paint them", False, _both("8,0,8,0")),
    RequestFlag("controlnets", ("--controlnet",),
                {Refs.PATHS: "DIR:IMAGE[:SCALE[:START[:END]]]", Refs.NAMES: "NAME:IMAGE[:SCALE[:START[:END]]]"},
                "a ControlNet unit (repeatable): model (a diffusers directory in-process, an operator-registered "
                "name for a server) and control image", True, _both("edges:{file}:0.8:0.1:0.9")),
    RequestFlag("controlnets", ("--control-preprocess",), _both("{none,canny}"),
                "preprocess every --controlnet image (default: none, the image is a control map)", False,
                _both("canny")),
    RequestFlag("ip_adapters", ("--ip-adapter",),
                {Refs.PATHS: "DIR:IMAGE[:SCALE]", Refs.NAMES: "NAME:IMAGE[:SCALE]"},
                "an IP-Adapter reference image (repeatable): model (directory in-process, registered name for a "
                "server) and image", True, _both("face:{file}:0.7")),
    RequestFlag("embeddings", ("--embedding",), {Refs.PATHS: "FILE[:TOKEN]", Refs.NAMES: "NAME[:TOKEN]"},
                "a textual-inversion embedding (repeatable; a file in-process, an uploaded name for a server); "
                "TOKEN overrides the file's token", True, {Refs.PATHS: "{file}:<tok>", Refs.NAMES: "my-ti:<tok>"}),
    RequestFlag("hypernetworks", ("--hypernetwork",), {Refs.PATHS: "FILE[:STRENGTH]", Refs.NAMES: "NAME[:STRENGTH]"},
                "an A1111-style hypernetwork in sdserve's layout (repeatable; a file in-process, an uploaded name "
                "for a server; convert .pt files first)", True, {Refs.PATHS: "{file}:0.7", Refs.NAMES: "hn:0.7"}),
)


def add_request_flags(parser: argparse.ArgumentParser, refs: Refs) -> None:
    """Register every request flag on `parser` (dests: the field name for scalars, `_flag_dest`
    for the table's entries)."""
    from sdserve.api.convert import request_fields

    fields = parser.add_argument_group("request fields (GenerateRequest)")
    for field in request_fields():
        flags = [f"--{field.name.replace('_', '-')}", *SHORTHANDS.get(field.name, [])]
        fields.add_argument(*flags, dest=field.name, type=field.python_type, default=None, help=field.comment)
    inputs = parser.add_argument_group("adapters and image inputs (GenerateRequest's lists and images)")
    for entry in FLAGS:
        choices = ["none", "canny"] if entry.flags[0] == "--control-preprocess" else None
        inputs.add_argument(*entry.flags, dest=_flag_dest(entry), action="append" if entry.repeat else "store",
                            default=[] if entry.repeat else None, metavar=None if choices else entry.metavar[refs],
                            choices=choices, help=entry.help)


def _flag_dest(entry: RequestFlag) -> str:
    return entry.flags[0].lstrip("-").replace("-", "_")


def trailing_numbers(text: str, max_numbers: int, keep: int = 1) -> tuple[list[str], list[float]]:
    """Split `A[:B...][:N1[:N2...]]` into its ':'-parts and up to `max_numbers` trailing numbers,
    leaving at least `keep` parts: a path may hold ':' as long as what follows its last ':' is not
    a number."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > keep and len(numbers) < max_numbers:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    return parts, numbers


def parse_lora_flag(text: str, refs: Refs = Refs.PATHS) -> dict[str, Any]:
    """`PATH_OR_NAME[:SCALE[:START[:END]]]` -> an AdapterRef dict."""
    parts, numbers = trailing_numbers(text, 3)
    target = ":".join(parts)
    if not target:
        raise ValueError("missing " + ("path" if refs is Refs.PATHS else "name"))
    key = "path" if refs is Refs.PATHS else "name"
    return {key: target, **dict(zip(("scale", "start", "end"), numbers))}


def _model_image(text: str, flag: str, max_numbers: int) -> tuple[str, Path, list[float]]:
    """`MODEL:IMAGE[:N...]` -> (model, image path, trailing numbers)."""
    parts, numbers = trailing_numbers(text, max_numbers, keep=2)
    if len(parts) < 2 or not parts[0]:
        fail(f"{flag} {text!r}: expected MODEL:IMAGE")
    return ":".join(parts[:-1]), Path(parts[-1]), numbers


def read_file(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"{flag}: cannot read {path.name} ({exc.__class__.__name__})")


def _adapters(texts: list[str], refs: Refs) -> list[dict[str, Any]]:
    out = []
    for text in texts:
        try:
            out.append(parse_lora_flag(text, refs))
        except ValueError as exc:
            fail(f"--lora {text!r}: {exc}")
    return out


def _embedding(text: str, refs: Refs) -> dict[str, Any]:
    # An existing file's name may hold ':'; otherwise what follows the last ':' is the token.
    whole = refs is Refs.PATHS and Path(text).exists()
    target, _, token = (text, "", "") if whole or ":" not in text else text.rpartition(":")
    if not target:
        fail(f"--embedding {text!r}: expected {'FILE' if refs is Refs.PATHS else 'NAME'}[:TOKEN]")
    entry = {"path" if refs is Refs.PATHS else "name": target}
    return {**entry, "token": token} if token else entry


def _hypernetwork(text: str, refs: Refs) -> dict[str, Any]:
    parts, numbers = trailing_numbers(text, 1)
    target = ":".join(parts)
    if not target:
        fail(f"--hypernetwork {text!r}: expected {'FILE' if refs is Refs.PATHS else 'NAME'}[:STRENGTH]")
    entry: dict[str, Any] = {"path" if refs is Refs.PATHS else "name": target}
    return {**entry, "strength": numbers[0]} if numbers else entry


def _outpaint(text: str) -> dict[str, int]:
    try:
        margins = [int(v) for v in text.split(",")]
    except ValueError:
        margins = []
    if len(margins) != 4:
        fail("--outpaint: give four integers L,T,R,B")
    return dict(zip(("left", "top", "right", "bottom"), margins))


_Builder = Callable[[argparse.Namespace, Refs], Any]


def _controlnets(args: argparse.Namespace, refs: Refs) -> list[dict[str, Any]]:
    units = []
    for text in args.controlnet:
        model, image, numbers = _model_image(text, "--controlnet", 3)
        unit = {"model": model, "image": read_file(image, "--controlnet"), **dict(zip(("scale", "start", "end"), numbers))}
        if args.control_preprocess is not None:
            unit["preprocess"] = args.control_preprocess
        units.append(unit)
    return units


def _ip_adapters(args: argparse.Namespace, refs: Refs) -> list[dict[str, Any]]:
    units = []
    for text in args.ip_adapter:
        model, image, numbers = _model_image(text, "--ip-adapter", 1)
        units.append({"model": model, "image": read_file(image, "--ip-adapter"), **dict(zip(("scale",), numbers))})
    return units


# field -> how its value is built from the parsed flags (an empty list or None: absent)
_BUILDERS: dict[str, _Builder] = {
    "adapters": lambda args, refs: _adapters(args.lora, refs),
    "init_image": lambda args, refs: None if args.init_image is None else read_file(Path(args.init_image), "--init-image"),
    "mask": lambda args, refs: None if args.mask is None else read_file(Path(args.mask), "--mask"),
    "outpaint": lambda args, refs: None if args.outpaint is None else _outpaint(args.outpaint),
    "controlnets": _controlnets,
    "ip_adapters": _ip_adapters,
    "embeddings": lambda args, refs: [_embedding(t, refs) for t in args.embedding],
    "hypernetworks": lambda args, refs: [_hypernetwork(t, refs) for t in args.hypernetwork],
}


def request_values(args: argparse.Namespace, refs: Refs) -> dict[str, Any]:
    """The request the flags describe: GenerateRequest field names -> values (JSON form; image
    fields as raw bytes, which `api.convert.pb_from_dict` and the client take). Flags not given
    are left out; a bad flag value is one line on stderr and exit 2."""
    from sdserve.api.convert import request_fields

    if args.control_preprocess is not None and not args.controlnet:
        fail("--control-preprocess needs a --controlnet")
    values: dict[str, Any] = {f.name: getattr(args, f.name) for f in request_fields() if getattr(args, f.name) is not None}
    for field, build in _BUILDERS.items():
        value = build(args, refs)
        if value is not None and value != []:
            values[field] = value
    return values


def read_requests_file(path: Path, model: str | None) -> list[tuple[str, dict[str, Any]]]:
    """A JSON-lines file of GenerateRequests -> [(where, request dict)]; `model` fills lines that
    name none. Only JSON syntax is checked here; the schema's checks come when each is converted."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"--requests: cannot read {path} ({exc.__class__.__name__})")
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            fail(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})")
        if not isinstance(data, dict):
            fail(f"{where}: a request must be a JSON object")
        if model and not data.get("model"):
            data = {**data, "model": model}
        requests.append((where, data))
    if not requests:
        fail(f"--requests: {path.name} holds no requests")
    return requests


def check_requests_flags(args: argparse.Namespace) -> None:
    """--requests takes every request from the file: only --model may be given besides it."""
    if args.out_dir is None:
        fail("--requests needs --out-dir")
    if args.prompt is not None:
        fail("give either --prompt or --requests, not both")
    if args.lora:
        fail("--lora sets one request's stack; in a requests file use \"adapters\": [...]")


def output_paths(args: argparse.Namespace, index: int, num_images: int) -> list[Path]:
    """Where request `index`'s images go: --out (FILE_k.png for several) or, with --requests,
    --out-dir/0000.png (0000_k.png for several), in input order."""
    if args.requests is not None:
        stem, directory = f"{index:04d}", args.out_dir
        if num_images == 1:
            return [directory / f"{stem}.png"]
        return [directory / f"{stem}_{k}.png" for k in range(num_images)]
    if num_images == 1:
        return [args.out]
    return [args.out.with_name(f"{args.out.stem}_{k}{args.out.suffix}") for k in range(num_images)]

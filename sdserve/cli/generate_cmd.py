"""`sdserve generate`: run requests through the engine in-process and write PNGs.

Flags are GenerateRequest's field names with dashes (generated from the proto, so the CLI and
the API cannot drift), plus shorthands: `--guidance` for `--guidance-scale`, and
`--lora PATH[:SCALE[:START[:END]]]` (repeatable) for an entry of `adapters`. With `--requests`,
every line of a JSON-lines file is one request with the proto's field names; all of them go
through the engine together, and `DIR/0000.png`, `DIR/0001.png`, ... come out in input order.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdserve.cli.common import EXIT_FAILURE, EXIT_USAGE, fail, fail_on, quiet_libraries
from sdserve.errors import SdserveError

SHORTHANDS = {"guidance_scale": ["--guidance"]}


def register(subparsers: argparse._SubParsersAction) -> None:
    from sdserve.api.convert import request_fields

    parser = subparsers.add_parser(
        "generate",
        help="generate images in-process (one request from flags, or a JSON-lines requests file)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fields = parser.add_argument_group("request fields (GenerateRequest)")
    for field in request_fields():
        flags = [f"--{field.name.replace('_', '-')}", *SHORTHANDS.get(field.name, [])]
        fields.add_argument(*flags, dest=field.name, type=field.python_type, default=None, help=field.comment)
    fields.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE[:START[:END]]]",
        help="add a LoRA / Concept Slider to the stack (repeatable); scale 1, start 0, end 1 by default",
    )
    images = parser.add_argument_group("image inputs (init_image, mask, outpaint)")
    images.add_argument("--init-image", type=Path, metavar="FILE", help="PNG/JPEG for image-to-image or inpainting")
    images.add_argument("--mask", type=Path, metavar="FILE", help="inpainting mask (white repaints)")
    images.add_argument("--outpaint", metavar="L,T,R,B", help="grow the init image by these margins and paint them")
    images.add_argument("--controlnet", action="append", default=[], metavar="DIR:IMAGE[:SCALE[:START[:END]]]",
                        help="a ControlNet unit (repeatable): model directory and control image")
    images.add_argument("--control-preprocess", choices=["none", "canny"], default=None,
                        help="preprocess every --controlnet image (default: none, the image is a control map)")
    images.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                        help="a textual-inversion embedding (repeatable); TOKEN overrides the file's token")
    images.add_argument("--hypernetwork", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="an A1111-style hypernetwork in sdserve's layout (repeatable; convert .pt first)")
    images.add_argument("--ip-adapter", action="append", default=[], metavar="DIR:IMAGE[:SCALE]",
                        help="an IP-Adapter reference image (repeatable)")
    io = parser.add_argument_group("input and output")
    io.add_argument("--out", type=Path, help="output PNG (one request from flags)")
    io.add_argument("--requests", type=Path, help="JSON-lines file, one GenerateRequest per line")
    io.add_argument("--from-png", type=Path, metavar="FILE",
                    help="re-run the request in FILE's A1111 'parameters' chunk (flags override its values; "
                    "give its LoRAs with --lora, embeddings with --embedding, init image with --init-image)")
    io.add_argument("--out-dir", type=Path, help="output directory for --requests")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--vae", metavar="FILE_OR_DIR",
                        help="use this VAE instead of the model's own (for the model --model names, else the "
                        "default): a .safetensors file (original or diffusers layout) or an AutoencoderKL directory")
    engine.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    engine.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")
    engine.add_argument("--max-batch-rows", type=int, default=16, help="most UNet rows per step (default: 16)")
    engine.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def parse_lora_flag(text: str) -> dict[str, Any]:
    """`PATH[:SCALE[:START[:END]]]` -> an AdapterRef dict. Trailing numbers are options, so a
    path may itself contain ':' as long as what follows its last ':' is not a number."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 3:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise ValueError("missing path")
    return {"path": path, **dict(zip(("scale", "start", "end"), numbers))}


def _specs_from_args(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from sdserve.api.convert import request_fields, spec_from_dict, spec_from_json_line

    if args.requests is not None and args.from_png is not None:
        fail("give either --from-png or --requests, not both")
    if args.requests is not None:
        if args.out_dir is None:
            fail("--requests needs --out-dir")
        if args.prompt is not None:
            fail("give either --prompt or --requests, not both")
        if args.lora:
            fail("--lora sets one request's stack; in a requests file use \"adapters\": [{\"path\": ...}]")
        try:
            lines = args.requests.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"--requests: cannot read {args.requests} ({exc.__class__.__name__})")
        specs = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{args.requests.name} line {number}"
            try:
                spec = spec_from_json_line(line)
            except SdserveError as exc:
                fail_on(exc, where)
            if not spec.model and args.model:
                spec = replace(spec, model=args.model)
            specs.append((where, spec))
        if not specs:
            fail(f"--requests: {args.requests.name} holds no requests")
        return specs
    if args.out is None:
        fail("give --out FILE.png (or --requests FILE --out-dir DIR)")
    if args.prompt is None and args.from_png is None:
        fail("--prompt is required")
    values: dict[str, Any] = {}
    if args.from_png is not None:
        from sdserve.cli.from_png import request_values

        for text in args.lora:  # checked here, before the PNG's hashes are matched against them
            try:
                parse_lora_flag(text)
            except ValueError as exc:
                fail(f"--lora {text!r}: {exc}")
        values = request_values(args.from_png, args.lora, args.embedding, args.init_image is not None,
                                len(args.controlnet) + len(args.ip_adapter))
    values.update({f.name: getattr(args, f.name) for f in request_fields() if getattr(args, f.name) is not None})
    adapters = []
    for text in [] if args.from_png is not None else args.lora:  # --from-png: the PNG's stack
        try:
            adapters.append(parse_lora_flag(text))
        except ValueError as exc:
            fail(f"--lora {text!r}: {exc}")
    if adapters:
        values["adapters"] = adapters
    try:
        spec = spec_from_dict(values)
    except SdserveError as exc:
        fail_on(exc)
    return [("request", replace(spec, **_image_fields(args)))]


def _split_model_image(text: str, flag: str, max_numbers: int) -> tuple[str, Path, list[float]]:
    """`MODEL:IMAGE[:N...]` -> (model, image path, trailing numbers)."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 2 and len(numbers) < max_numbers:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    if len(parts) < 2:
        fail(f"{flag} {text!r}: expected MODEL:IMAGE")
    return ":".join(parts[:-1]), Path(parts[-1]), numbers


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"{flag}: cannot read {path.name} ({exc.__class__.__name__})")


def _image_fields(args: argparse.Namespace) -> dict[str, Any]:
    from sdserve.api.types import ControlSpec, IPAdapterSpec

    fields: dict[str, Any] = {}
    units = []
    for text in args.controlnet:
        model, image, numbers = _split_model_image(text, "--controlnet", 3)
        options = dict(zip(("scale", "start", "end"), numbers))
        units.append(ControlSpec(model=model, image=_read(image, "--controlnet"),
                                 preprocess=args.control_preprocess or "none", **options))
    if units:
        fields["controlnets"] = tuple(units)
    ip_units = []
    for text in args.ip_adapter:
        model, image, numbers = _split_model_image(text, "--ip-adapter", 1)
        ip_units.append(IPAdapterSpec(model=model, image=_read(image, "--ip-adapter"),
                                      scale=numbers[0] if numbers else None))
    if ip_units:
        fields["ip_adapters"] = tuple(ip_units)
    from sdserve.api.types import EmbeddingSpec, HypernetworkSpec

    embeddings = []
    for text in args.embedding:
        path, _, token = text.rpartition(":") if ":" in text and not Path(text).exists() else (text, "", "")
        embeddings.append(EmbeddingSpec(path=path, token=token))
    if embeddings:
        fields["embeddings"] = tuple(embeddings)
    hypernetworks = []
    for text in args.hypernetwork:
        entry = parse_lora_flag(text)  # PATH[:NUMBER]: the same trailing-number rule
        if set(entry) - {"path", "scale"}:
            fail(f"--hypernetwork {text!r}: expected FILE[:STRENGTH]")
        hypernetworks.append(HypernetworkSpec(path=entry["path"], strength=entry.get("scale")))
    if hypernetworks:
        fields["hypernetworks"] = tuple(hypernetworks)
    for name, path in (("init_image", args.init_image), ("mask", args.mask)):
        if path is not None:
            try:
                fields[name] = path.read_bytes()
            except OSError as exc:
                fail(f"--{name.replace('_', '-')}: cannot read {path.name} ({exc.__class__.__name__})")
    if args.outpaint is not None:
        try:
            margins = tuple(int(v) for v in args.outpaint.split(","))
        except ValueError:
            margins = ()
        if len(margins) != 4:
            fail("--outpaint: give four integers L,T,R,B")
        fields["outpaint"] = margins
    return fields


def _output_paths(args: argparse.Namespace, index: int, num_images: int) -> list[Path]:
    if args.requests is not None:
        stem, directory = f"{index:04d}", args.out_dir
        if num_images == 1:
            return [directory / f"{stem}.png"]
        return [directory / f"{stem}_{k}.png" for k in range(num_images)]
    if num_images == 1:
        return [args.out]
    return [args.out.with_name(f"{args.out.stem}_{k}{args.out.suffix}") for k in range(num_images)]


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from tqdm import tqdm

    from sdserve.engine import Engine, EngineConfig, ModelStore
    from sdserve.engine.png import encode_png

    specs = _specs_from_args(args)
    config = EngineConfig(max_batch_rows=args.max_batch_rows, device=args.device, dtype=args.dtype)
    store = ModelStore(config)
    if args.vae is not None:
        store.vaes[store.resolve_name(args.model or "")] = args.vae
    engine = Engine(config, models=store)
    requests = []
    for where, spec in specs:
        try:
            requests.append(engine.validate(spec))
        except SdserveError as exc:
            fail_on(exc, where if args.requests is not None else "")

    bar = tqdm(total=0, unit="step", disable=args.quiet, file=sys.stderr, desc="denoising")

    def show_progress(event) -> None:
        if event.kind == "admitted":
            bar.total += event.total_steps
            bar.refresh()
        elif event.kind == "step":
            bar.update(1)

    engine.observers.append(show_progress)
    started = time.perf_counter()
    outcomes = engine.generate(requests)
    bar.close()
    elapsed = time.perf_counter() - started

    failed = 0
    bad_input = True  # exit 2 when every failure was the input's fault (a bad adapter file, ...)
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, SdserveError):
            failed += 1
            bad_input = bad_input and outcome.status in ("INVALID_ARGUMENT", "NOT_FOUND")
            print(f"sdserve: error: {specs[index][0]}: {outcome}", file=sys.stderr)
            continue
        paths = _output_paths(args, index, len(outcome.images))
        for k, (path, image) in enumerate(zip(paths, outcome.images)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(image, outcome.parameters(k)))
            print(f"{path}  seed={outcome.request.seed}")
    print(f"{len(outcomes) - failed} request(s) in {elapsed:.2f} s", file=sys.stderr)
    if not failed:
        return 0
    return EXIT_USAGE if bad_input else EXIT_FAILURE

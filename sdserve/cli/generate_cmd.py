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
from pathlib import Path
from typing import Any

from sdserve.cli.common import EXIT_FAILURE, EXIT_USAGE, fail, fail_on, quiet_libraries
from sdserve.cli.image_output import SUFFIXES, add_format_flags, checked_quality, encode_image
from sdserve.cli.request_flags import (
    Refs,
    add_request_flags,
    check_requests_flags,
    output_paths,
    parse_lora_flag,
    read_requests_file,
    request_values,
)
from sdserve.errors import SdserveError

__all__ = ["parse_lora_flag", "register", "run"]  # parse_lora_flag: from_png and tests read it here


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images in-process (one request from flags, or a JSON-lines requests file)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_request_flags(parser, Refs.PATHS)
    io = parser.add_argument_group("input and output")
    io.add_argument("--out", type=Path, help="output file (one request from flags; PNG unless --format)")
    io.add_argument("--requests", type=Path, help="JSON-lines file, one GenerateRequest per line")
    io.add_argument("--from-png", type=Path, metavar="FILE",
                    help="re-run the request in FILE's A1111 'parameters' chunk (flags override its values; "
                    "give its LoRAs with --lora, embeddings with --embedding, init image with --init-image)")
    io.add_argument("--out-dir", type=Path, help="output directory for --requests")
    add_format_flags(io)
    engine = parser.add_argument_group("engine")
    engine.add_argument("--vae", metavar="FILE_OR_DIR",
                        help="use this VAE instead of the model's own (for the model --model names, else the "
                        "default): a .safetensors file (original or diffusers layout) or an AutoencoderKL directory")
    engine.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    engine.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")
    engine.add_argument("--max-batch-rows", type=int, default=16, help="most UNet rows per step (default: 16)")
    engine.add_argument("--attention", choices=["sdpa", "xformers"], default="sdpa",
                        help="the UNet's attention kernel: sdpa (torch, any device; default) or xformers (needs "
                        "the xformers extra and CUDA; refused otherwise)")
    engine.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _specs_from_args(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from sdserve.api.convert import spec_from_dict

    if args.requests is not None and args.from_png is not None:
        fail("give either --from-png or --requests, not both")
    if args.requests is not None:
        check_requests_flags(args)
        specs = []
        for where, data in read_requests_file(args.requests, args.model):
            try:
                specs.append((where, spec_from_dict(data)))
            except SdserveError as exc:
                fail_on(exc, where)
        return specs
    if args.out is None:
        fail("give --out FILE.png (or --requests FILE --out-dir DIR)")
    if args.prompt is None and args.from_png is None:
        fail("--prompt is required")
    flagged = request_values(args, Refs.PATHS)  # checks every flag, --lora included
    values: dict[str, Any] = {}
    if args.from_png is not None:
        from sdserve.cli.from_png import request_values as png_values

        values = png_values(args.from_png, args.lora, args.embedding, args.init_image is not None,
                            len(args.controlnet) + len(args.ip_adapter))
        flagged.pop("adapters", None)  # --from-png: the PNG's stack, its files matched among --lora
    values.update(flagged)
    try:
        spec = spec_from_dict(values)
    except SdserveError as exc:
        fail_on(exc)
    return [("request", spec)]


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from tqdm import tqdm

    from sdserve.engine import Engine, EngineConfig, ModelStore
    quality = checked_quality(args)
    specs = _specs_from_args(args)
    try:
        config = EngineConfig(max_batch_rows=args.max_batch_rows, device=args.device, dtype=args.dtype,
                              attention=args.attention)
    except SdserveError as exc:  # attention = xformers where it cannot run: one line, exit 2
        fail_on(exc)
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
        paths = output_paths(args, index, len(outcome.images))
        if args.requests is not None:  # DIR/0000.png -> DIR/0000.jpg; --out keeps the name the user gave
            paths = [path.with_suffix(SUFFIXES[args.format]) for path in paths]
        for k, (path, image) in enumerate(zip(paths, outcome.images)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_image(image, outcome.parameters(k), args.format, quality))
            print(f"{path}  seed={outcome.request.seed}")
    print(f"{len(outcomes) - failed} request(s) in {elapsed:.2f} s", file=sys.stderr)
    if not failed:
        return 0
    return EXIT_USAGE if bad_input else EXIT_FAILURE

"""`sdserve compile fuse|unfuse|onnx|refit|tensorrt|check`: compiled variants of a model, written to new directories.

Heavy imports (torch, diffusers, onnx) happen inside the command functions, so `sdserve --help`
and other subcommands stay light. Bad input is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sdserve.cli.common import fail, fail_on, quiet_libraries
from sdserve.errors import SdserveError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compile", help="fuse adapter stacks into a model, export ONNX, check exports")
    sub = parser.add_subparsers(dest="compile_command", required=True, metavar="STEP")
    _register_fuse(sub)
    _register_onnx(sub)
    _register_refit(sub)
    _register_tensorrt(sub)
    _register_check(sub)


def _quiet() -> None:
    """sdserve's own bars only: the hub's per-file loading and saving bars are noise here."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet_libraries()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="the directory to write")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _register_fuse(sub: argparse._SubParsersAction) -> None:
    fuse = sub.add_parser(
        "fuse", help="write a model with a LoRA stack folded into its weights",
        description="Write a diffusers model directory whose weights are W + sum s*B@A for every module the "
                    "stack adapts (LoCon convs, and LoHa/LoKr in the exact LoRA form sdserve serves them in); "
                    "embeddings become tokenizer tokens and token-table rows. The base directory is only read.",
    )
    fuse.add_argument("--model", required=True, metavar="NAME|DIR", help="built-in model name or diffusers directory")
    fuse.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                      help="a LoRA file (LoCon, LoHa, LoKr too) and its scale (default 1), repeatable, in stack order")
    fuse.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                      help="a single-vector textual-inversion embedding and its token, repeatable")
    _common(fuse)
    fuse.set_defaults(func=_fuse, unfuse=False)

    unfuse = sub.add_parser(
        "unfuse", help="subtract the stack a fused model was made with",
        description="Write the fused model with the same LoRA stack subtracted: the base weights within "
                    "float32 rounding (the max relative error against the recorded base is printed).",
    )
    unfuse.add_argument("--model", required=True, metavar="FUSED", help="a directory written by `compile fuse`")
    unfuse.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="the fused LoRAs at their scales, repeatable")
    _common(unfuse)
    unfuse.set_defaults(func=_fuse, unfuse=True, embedding=[])


def _fuse(args: argparse.Namespace) -> None:
    _quiet()
    from sdserve.compile.fused_model import FuseConfig, fuse_model, unfuse_model
    from sdserve.compile.source import parse_embedding_arg, parse_lora_arg

    try:
        config = FuseConfig(
            model=args.model, out=args.out, force=args.force, progress=not args.no_progress,
            loras=tuple(parse_lora_arg(text) for text in args.lora),
            embeddings=tuple(parse_embedding_arg(text) for text in args.embedding),
        )
        result = unfuse_model(config) if args.unfuse else fuse_model(config)
    except SdserveError as error:
        fail_on(error)
    verb = "unfused" if args.unfuse else "fused"
    line = f"{verb} {result.modules} modules"
    if result.tokens:
        line += f", added tokens {' '.join(result.tokens)}"
    if args.unfuse:
        if result.max_relative_error is None:
            line += "; the recorded base is not at hand, no error measured"
        else:
            line += f"; max relative error against {result.compared_with}: {result.max_relative_error:.3g}"
    print(f"{line}; wrote {result.out}")


def _register_onnx(sub: argparse._SubParsersAction) -> None:
    onnx = sub.add_parser(
        "onnx", help="export a model's components to ONNX, each checked in onnxruntime",
        description="Export the text encoder(s), UNet (dynamic batch and size), VAE decoder and encoder, and any "
                    "--controlnet to ONNX, check each in onnxruntime against torch on seeded inputs (fails past "
                    "the tolerance), and write the scheduler, tokenizer(s), defaults and a manifest beside them.",
    )
    onnx.add_argument("--model", required=True, metavar="NAME|DIR", help="built-in model name or diffusers directory")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    onnx.add_argument("--fp16", action="store_true", help="export float16 weights and activations")
    onnx.add_argument("--controlnet", action="append", default=[], metavar="NAME=DIR",
                      help="a ControlNet registered for this model, exported beside it (repeatable)")
    _common(onnx)
    onnx.set_defaults(func=_onnx)


def _onnx(args: argparse.Namespace) -> None:
    _quiet()
    from sdserve.compile.onnx_export import OnnxConfig, export_onnx, parse_controlnet_arg

    try:
        config = OnnxConfig(model=args.model, out=args.out, opset=args.opset, fp16=args.fp16, force=args.force,
                            progress=not args.no_progress,
                            controlnets=tuple(parse_controlnet_arg(text) for text in args.controlnet))
        result = export_onnx(config)
    except SdserveError as error:
        fail_on(error)
    print(f"{'component':24s} {'max abs':>10s} {'max rel':>10s} {'tolerance':>10s}")
    for check in result.checks:
        print(f"{check.component:24s} {check.max_abs:10.3g} {check.max_rel:10.3g} {check.tolerance:10.3g}")
    if result.failed:
        fail(f"onnxruntime disagrees with torch past the tolerance in {', '.join(result.failed)}; "
             f"nothing written to {args.out}", code=1)
    print(f"wrote {result.out}")


def _register_refit(sub: argparse._SubParsersAction) -> None:
    refit = sub.add_parser(
        "refit", help="new weights for an ONNX export, for another LoRA stack, without re-export",
        description="Write a directory holding, per component, the initializers the stack changes (base + stack, "
                    "always from the export's base weights), beside the export's configs, scheduler and "
                    "tokenizers. The graphs and weights are read from the export in place (a path relative to "
                    "OUT): keep the export where it is; a refit whose export is gone or changed is refused. "
                    "Checked in onnxruntime against the torch model with the stack fused where the base model "
                    "is at hand.",
    )
    refit.add_argument("--onnx", required=True, type=Path, metavar="DIR", help="a directory written by `compile onnx`")
    refit.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="a LoRA file (LoCon, LoHa, LoKr too) and its scale (default 1), repeatable")
    refit.add_argument("--no-check", action="store_true", help="skip the onnxruntime check against torch")
    _common(refit)
    refit.set_defaults(func=_refit)


def _refit(args: argparse.Namespace) -> None:
    _quiet()
    from sdserve.compile.refit import RefitConfig, refit
    from sdserve.compile.source import parse_lora_arg

    try:
        config = RefitConfig(onnx=args.onnx, out=args.out, force=args.force, progress=not args.no_progress,
                             check=not args.no_check, loras=tuple(parse_lora_arg(text) for text in args.lora))
        result = refit(config)
    except SdserveError as error:
        fail_on(error)
    for name, check in result.checks:
        print(f"{name:24s} max abs {check.max_abs:10.3g} max rel {check.max_rel:10.3g} tolerance {check.tolerance:g}")
    if result.failed:
        fail(f"the refit graphs disagree with the fused torch model past the tolerance in "
             f"{', '.join(result.failed)}; nothing written to {args.out}", code=1)
    note = f" (not checked: {result.unchecked})" if result.unchecked else ""
    print(f"refit {result.initializers} weights{note}; wrote {result.out}")


def _register_tensorrt(sub: argparse._SubParsersAction) -> None:
    tensorrt = sub.add_parser(
        "tensorrt", help="build refittable TensorRT engines from an ONNX export (needs sdserve[tensorrt])",
        description="Build a TensorRT engine of each served graph (text encoders, UNet, VAE) of a `compile onnx` "
                    "or `compile refit` directory, with the refit map's weights refittable; a refit directory's "
                    "values are refitted into engines built from the export's base weights.",
    )
    tensorrt.add_argument("--onnx", required=True, type=Path, metavar="DIR",
                          help="a directory written by `compile onnx` or `compile refit`")
    tensorrt.add_argument("--max-batch", type=int, default=8, help="largest batch each engine takes (default 8)")
    tensorrt.add_argument("--fp16", action="store_true", help="allow float16 kernels")
    _common(tensorrt)
    tensorrt.set_defaults(func=_tensorrt)


def _tensorrt(args: argparse.Namespace) -> None:
    _quiet()
    from sdserve.compile.tensorrt_build import BuildFailed, TensorRTConfig, build_tensorrt

    try:
        result = build_tensorrt(TensorRTConfig(onnx=args.onnx, out=args.out, max_batch=args.max_batch, fp16=args.fp16,
                                               force=args.force, progress=not args.no_progress))
    except SdserveError as error:
        fail_on(error)
    except BuildFailed as error:
        fail(f"{error}; nothing written to {args.out}", code=1)
    refitted = f", {result.refitted} weights refitted" if result.refitted else ""
    print(f"built {', '.join(result.engines)}{refitted}; wrote {result.out}")


def _register_check(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser("check", help="check a compiled directory: its manifest, version and components")
    check.add_argument("dir", type=Path, metavar="DIR", help="a directory written by `compile onnx`")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> None:
    from sdserve.compile.manifest import read_manifest

    try:
        manifest = read_manifest(args.dir, flag="DIR")
    except SdserveError as error:
        fail_on(error)
    names = ", ".join(manifest.components)
    print(f"{args.dir}: {manifest.kind} export of {manifest.base} (sdserve {manifest.sdserve_version}, "
          f"opset {manifest.opset}): {names}")

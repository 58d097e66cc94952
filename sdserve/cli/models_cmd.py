"""`sdserve models list|path|convert`: the built-in models, where their directories are, and the
diffusers directory a single-file checkpoint converts to (cached; `--model FILE` uses the same)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sdserve.cli.common import fail, fail_on


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list built-in models or print a model's directory")
    sub = parser.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="list the built-in models").set_defaults(func=_list)
    path = sub.add_parser("path", help="print the directory of a built-in model (building it if needed)")
    path.add_argument("name", nargs="?", default="default")
    path.set_defaults(func=_path)
    convert = sub.add_parser(
        "convert", help="convert a single-file .safetensors checkpoint (SD 1.x/2.x/XL layout) once; print its directory"
    )
    convert.add_argument("file", type=Path)
    convert.set_defaults(func=_convert)


def _list(args: argparse.Namespace) -> None:
    from sdserve.models.builtin import builtin_names, builtin_path
    from sdserve.models.configs import BUILTIN_SPECS

    for name in builtin_names():
        spec = BUILTIN_SPECS[name]
        built = (builtin_path(name, build=False) / "model_index.json").exists()
        defaults = json.dumps(
            {
                "size": f"{spec.defaults.width}x{spec.defaults.height}",
                "steps": spec.defaults.steps,
                "guidance": spec.defaults.guidance_scale,
                "guidance_interval": [spec.defaults.guidance_start, spec.defaults.guidance_end],
                "scheduler": spec.defaults.scheduler,
            }
        )
        print(f"{name:10s} {spec.family:5s} {'ready' if built else 'built on first use':18s} {defaults}")
        print(f"{'':10s} {spec.description}")


def _path(args: argparse.Namespace) -> None:
    from sdserve.models.builtin import builtin_names, builtin_path

    if args.name not in builtin_names():
        fail(f"unknown model {args.name!r}; built-in models are {', '.join(builtin_names())}")
    print(builtin_path(args.name))


def _convert(args: argparse.Namespace) -> None:
    from sdserve.cli.common import quiet_libraries
    from sdserve.errors import SdserveError
    from sdserve.models.single_file import converted_dir

    quiet_libraries()
    if not args.file.is_file():
        fail(f"{args.file.name}: no such file")
    try:
        print(converted_dir(args.file.resolve(), progress=lambda line: print(line, file=sys.stderr)))
    except SdserveError as exc:
        fail_on(exc)

"""`sdserve models list|path`: the built-in models and where their directories are."""

from __future__ import annotations

import argparse
import json

from sdserve.cli.common import fail


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list built-in models or print a model's directory")
    sub = parser.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="list the built-in models").set_defaults(func=_list)
    path = sub.add_parser("path", help="print the directory of a built-in model (building it if needed)")
    path.add_argument("name", nargs="?", default="default")
    path.set_defaults(func=_path)


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

"""`sdserve`: one entry point with subcommands.

Subcommand modules each expose `register(subparsers)`; optional ones (whose dependencies a
minimal install may lack) are skipped if they cannot be imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sdserve import __version__

SUBCOMMANDS = (
    "sdserve.cli.models_cmd",
    "sdserve.cli.generate_cmd",
    "sdserve.cli.train",
    "sdserve.cli.serve_cmd",
    "sdserve.cli.client_cmd",
    "sdserve.cli.adapters_cmd",
    "sdserve.cli.keys_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdserve",
        description="Multi-tenant Stable Diffusion inference with per-request adapter stacks.",
    )
    parser.add_argument("--version", action="version", version=f"sdserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a subcommand not written yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`sdserve`: one entry point with subcommands.

Subcommand modules each expose `register(subparsers)`; optional ones (whose dependencies a
minimal install may lack) are skipped if they cannot be imported. When the command line names a
subcommand, only its module is imported: `sdserve client ...` on a client machine loads neither
torch nor the server (tests/api/test_boundaries.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sdserve import __version__

SUBCOMMANDS = {  # command -> the module that registers it, in --help's order
    "models": "sdserve.cli.models_cmd",
    "generate": "sdserve.cli.generate_cmd",
    "train": "sdserve.cli.train",
    "compile": "sdserve.cli.compile_cmd",
    "serve": "sdserve.cli.serve_cmd",
    "client": "sdserve.cli.client_cmd",
    "adapters": "sdserve.cli.adapters_cmd",
    "keys": "sdserve.cli.keys_cmd",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for every subcommand, or for `command` alone when it is one."""
    parser = argparse.ArgumentParser(
        prog="sdserve",
        description="Multi-tenant Stable Diffusion inference with per-request adapter stacks.",
    )
    parser.add_argument("--version", action="version", version=f"sdserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = [SUBCOMMANDS[command]] if command in SUBCOMMANDS else list(SUBCOMMANDS.values())
    for module_name in wanted:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a subcommand not written yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

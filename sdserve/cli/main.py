"""`sdserve`: one entry point with subcommands.

Subcommand modules each expose `register(subparsers)`; optional ones (whose dependencies a
minimal install may lack) are skipped if they cannot be imported. When the command line names a
subcommand, only its module is imported: `sdserve client ...` on a client machine loads neither
torch nor the server (tests/api/test_boundaries.py). When it names none (`sdserve --help`,
`--version`, a typo), no subcommand module is imported at all: the top-level help lists each
command from SUBCOMMANDS' one-line summaries, so it starts in a fraction of a second
(tests/cli/test_startup.py keeps the summaries equal to the modules' own).
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
SUMMARIES = {  # command -> its `help=` in its module's register(), for the top-level help alone
    "models": "list built-in models or print a model's directory",
    "generate": "generate images in-process (one request from flags, or a JSON-lines requests file)",
    "train": "train models and adapters",
    "compile": "fuse adapter stacks into a model, export ONNX, check exports",
    "serve": "run the gRPC server",
    "client": "call a running server",
    "adapters": "convert adapter files, extract a LoRA from a fine-tuned model",
    "keys": "make API keys for the server's [[tenants]]",
}


def _top_level() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="sdserve",
        description="Multi-tenant Stable Diffusion inference with per-request adapter stacks.",
    )
    parser.add_argument("--version", action="version", version=f"sdserve {__version__}")
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def summary_parser() -> argparse.ArgumentParser:
    """The parser for a command line that names no subcommand: each command is only its summary.

    Parsing a real subcommand with it is a bug (`main` never does): its entries take no flags."""
    parser, subparsers = _top_level()
    for command, summary in SUMMARIES.items():
        subparsers.add_parser(command, help=summary, add_help=False)
    return parser


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for every subcommand, or for `command` alone when it is one."""
    parser, subparsers = _top_level()
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
    command = argv[0] if argv else None
    # No subcommand named: argparse prints help, the version or a usage error and exits, so the
    # subcommand modules (torch, diffusers, grpc behind some of them) need not load.
    parser = build_parser(command) if command in SUBCOMMANDS else summary_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`sdserve adapters convert IN OUT`: A1111 pickles (embeddings, hypernetworks) to safetensors.

Conversion is offline and weights-only (`torch.load(weights_only=True)`): a pickle that holds
anything but tensors and plain data is refused, never unpickled. The server loads only the
safetensors files this writes.
"""

from __future__ import annotations

import argparse
import os

from sdserve.cli.common import fail, fail_on
from sdserve.errors import SdserveError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("adapters", help="convert adapter files", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="adapters_command", required=True)
    convert = sub.add_parser("convert", help="convert an A1111 .pt embedding or hypernetwork to safetensors")
    convert.add_argument("input", metavar="IN.pt", help="the A1111 file (.pt/.bin)")
    convert.add_argument("output", metavar="OUT.safetensors", help="where to write the safetensors file")
    convert.add_argument("--kind", choices=("embedding", "hypernetwork"), default=None,
                         help="what the file must hold (default: detected)")
    convert.add_argument("--token", default=None,
                         help="the embedding's token (default: the name stored in the file)")
    convert.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    convert.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> None:
    from sdserve.adapters.convert import convert_file

    if not os.path.isfile(args.input):
        fail(f"{args.input}: no such file")
    if not args.output.endswith(".safetensors"):
        fail(f"{args.output}: the output must be a .safetensors file")
    if os.path.exists(args.output) and not args.force:
        fail(f"{args.output} exists; pass --force to overwrite it")
    try:
        kind = convert_file(args.input, args.output, kind=args.kind, token=args.token)
    except SdserveError as error:
        fail_on(error)
    print(f"wrote {kind} {args.output}")

"""`sdserve train data shapes ...`: write a captioned training folder from the shapes world.

`sdserve.cli.train` calls `register(kinds)` with its `train` subparsers; the flags mirror
`sdserve.trainers.shapes_folder.ShapesFolderConfig`. Bad values are one line naming the flag,
exit 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Cheap imports (numpy and PIL, no torch): the help texts list the world's vocabulary.
from sdserve.models.shapes.world import ALL_COLORS, ALL_KINDS, POSITIONS, SIZES, STYLES
from sdserve.trainers.shapes_folder import CONDITIONINGS, LAYOUTS, PAIR_ATTRIBUTES


def _list_help(what: str, values: tuple[str, ...], default: str) -> str:
    return f"comma-separated {what} to draw from, of {','.join(values)} (default: {default})"


def register(kinds: argparse._SubParsersAction) -> None:
    """Add `data shapes` under the `train` subcommand's subparsers."""
    data = kinds.add_parser("data", help="write training data folders for adapters")
    sources = data.add_subparsers(dest="data_source", required=True, metavar="SOURCE")
    shapes = sources.add_parser(
        "shapes",
        help="captioned images of the shapes world (kohya or imagefolder layout)",
        description="Write COUNT captioned PNGs of the synthetic shapes world, e.g. only teal outlined "
        "stars, for an adapter to learn what the default model cannot draw.",
    )
    shapes.add_argument("--out", type=Path, required=True, help="directory to create (empty or new)")
    shapes.add_argument("--count", type=int, required=True, help="number of images")
    shapes.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes (default 0)")
    shapes.add_argument("--kinds", help=_list_help("shape kinds", ALL_KINDS, "circle,square,triangle"))
    shapes.add_argument("--colors", help=_list_help("shape colours", ALL_COLORS, "the eight base colours"))
    shapes.add_argument("--backgrounds", help=_list_help("background colours", ALL_COLORS, "the eight base colours"))
    shapes.add_argument("--positions", help=_list_help("positions", POSITIONS, "all"))
    shapes.add_argument("--sizes", help=_list_help("sizes", SIZES, "both"))
    shapes.add_argument("--styles", help=_list_help("styles", STYLES, "filled"))
    shapes.add_argument("--shapes-per-image", type=int, choices=[1, 2],
                        help="shapes in each image (default: 1 or 2, as the base world)")
    shapes.add_argument("--exclude", metavar="TRIPLES",
                        help='"color,kind,position;..." combinations no image contains (e.g. held out for a '
                             'bench); "held-out" stands for the base world\'s 12 held-out triples')
    shapes.add_argument("--token", help="write this instead of the kind word in captions (DreamBooth: sks)")
    shapes.add_argument("--layout", choices=LAYOUTS,
                        help="kohya: NAME.png + NAME.txt; imagefolder: metadata.jsonl (default kohya; imagefolder "
                             "with --conditioning)")
    shapes.add_argument("--conditioning", choices=CONDITIONINGS,
                        help="mask: also write each scene's shape mask (white on black) as conditioning/NAME.png, "
                             "listed as conditioning_file_name in metadata.jsonl: a `sdserve train controlnet` folder")
    shapes.add_argument("--omit-position", action="store_true",
                        help="captions name no shape's position (for a ControlNet: the mask alone says where)")
    shapes.add_argument("--omit-size", action="store_true",
                        help="captions name no shape's size (for an adapter used with prompts that leave the size "
                             "open, e.g. a brightness slider composed with a size slider)")
    shapes.add_argument("--pairs", choices=PAIR_ATTRIBUTES,
                        help="write before/after pairs for `sdserve train slider --pairs` instead: before/NAME.png "
                             "(+ NAME.txt) and after/NAME.png, one-shape scenes alike but for this attribute "
                             "(size: a 9-13 px shape before, three times as large after; captions name no size. "
                             "background: the scene on black before, on white after; shapes never black or white; "
                             "captions name no background)")
    shapes.add_argument("--resolution", type=int, default=64,
                        help="image side, a multiple of 64; scenes are upscaled nearest-neighbour (default 64)")
    shapes.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it is a non-empty folder this command wrote")
    shapes.add_argument("--no-progress", action="store_true", help="no progress bar")
    shapes.set_defaults(func=run_shapes)


def _split(text: str | None, flag: str, default: tuple[str, ...]) -> tuple[str, ...]:
    from sdserve.errors import InvalidArgument

    if text is None:
        return default
    values = tuple(part.strip() for part in text.split(","))
    if not all(values):
        raise InvalidArgument(f"empty item in {text!r}", field=flag)
    return values


def config_from_args(args: argparse.Namespace):
    """A ShapesFolderConfig from the parsed flags; InvalidArgument naming the flag when one is bad."""
    from sdserve.trainers.shapes_folder import ShapesFolderConfig, check_shapes_folder_config, parse_exclude

    defaults = ShapesFolderConfig(out=args.out, count=args.count)
    cfg = ShapesFolderConfig(
        out=args.out,
        count=args.count,
        seed=args.seed,
        kinds=_split(args.kinds, "--kinds", defaults.kinds),
        colors=_split(args.colors, "--colors", defaults.colors),
        backgrounds=_split(args.backgrounds, "--backgrounds", defaults.backgrounds),
        positions=_split(args.positions, "--positions", defaults.positions),
        sizes=_split(args.sizes, "--sizes", defaults.sizes),
        styles=_split(args.styles, "--styles", defaults.styles),
        shapes_per_image=args.shapes_per_image,
        exclude=parse_exclude(args.exclude) if args.exclude else frozenset(),
        token=args.token,
        layout=args.layout or ("imagefolder" if args.conditioning else "kohya"),
        conditioning=args.conditioning,
        omit_position=args.omit_position,
        omit_size=args.omit_size,
        pairs=args.pairs,
        resolution=args.resolution,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    check_shapes_folder_config(cfg)
    return cfg


def run_shapes(args: argparse.Namespace) -> int:
    from sdserve.cli.common import fail
    from sdserve.errors import InvalidArgument
    from sdserve.trainers.shapes_folder import write_shapes_folder

    try:
        cfg = config_from_args(args)
        out = write_shapes_folder(cfg)
    except InvalidArgument as error:
        fail(str(error))
    except OSError as error:
        fail(f"--out: cannot write {args.out} ({error.strerror or error})", code=1)
    if cfg.pairs is not None:
        print(f"wrote {cfg.count} {cfg.pairs} pairs to {out} (before/, after/)")
    else:
        print(f"wrote {cfg.count} images to {out} ({cfg.layout} layout)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m sdserve.cli.train_data shapes ...`, the same parser standalone."""
    parser = argparse.ArgumentParser(prog="sdserve train")
    register(parser.add_subparsers(dest="train_kind", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

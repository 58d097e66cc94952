"""`sdserve models list|path|convert|fit-preview`: the built-in models, where their directories are,
the diffusers directory a single-file checkpoint converts to (cached; `--model FILE` uses the same),
and a model's stream-preview decoder fitted against its own VAE (engine/preview_fit.py)."""

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
    path.add_argument("name", nargs="?", default="default", help="a built-in model (default %(default)s)")
    path.set_defaults(func=_path)
    convert = sub.add_parser(
        "convert", help="convert a single-file .safetensors checkpoint (SD 1.x/2.x/XL layout) once; print its directory"
    )
    convert.add_argument("file", type=Path, help="a single-file .safetensors checkpoint (SD 1.x/2.x/XL layout)")
    convert.set_defaults(func=_convert)
    fit = sub.add_parser(
        "fit-preview",
        help="fit a model's GenerateStream preview decoder (latents to RGB) against its own VAE",
        description="Generate images with the model and render shapes-world scenes, encode and decode them with "
        "the model's VAE, and fit a map of each latent pixel's KxK neighbourhood to the decode at latent "
        "resolution: a two-layer net (KxK conv, SiLU, 1x1 conv; Adam on the L1 error) or, with --hidden 0, a "
        "linear map plus bias by least squares. Put the written file in the model's directory as "
        "preview_decoder.safetensors and the engine uses it for stream previews.",
    )
    fit.add_argument("--model", default="", help="a built-in model name or a diffusers directory (default: the built-in `default` model)")
    fit.add_argument("--out", type=Path, required=True,
                     help="file to write (the model's directory/preview_decoder.safetensors to use it)")
    fit.add_argument("--generated", type=int, default=24, help="images the model generates for the fit (default 24)")
    fit.add_argument("--rendered", type=int, default=48, help="shapes-world renders for the fit (default 48)")
    fit.add_argument("--steps", type=int, default=None, help="denoising steps of those images (default: the model's)")
    fit.add_argument("--kernel", type=int, default=3, help="neighbourhood size, odd: 1 = per pixel (default 3)")
    fit.add_argument("--hidden", type=int, default=16,
                     help="hidden width of the two-layer net (default 16); 0 = a linear map by least squares")
    fit.add_argument("--iterations", type=int, default=600, help="Adam steps of the net (default 600)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the captions, scenes and images (default 0)")
    fit.add_argument("--force", action="store_true", help="overwrite --out")
    fit.set_defaults(func=_fit_preview)


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


def _fit_preview(args: argparse.Namespace) -> None:
    from sdserve.cli.common import quiet_libraries
    from sdserve.errors import SdserveError

    if args.kernel < 1 or args.kernel % 2 != 1:
        fail("--kernel must be an odd number >= 1")
    if args.hidden < 0 or args.iterations < 1:
        fail("--hidden must be >= 0 and --iterations >= 1")
    if args.generated < 0 or args.rendered < 0 or args.generated + args.rendered < 1:
        fail("--generated and --rendered must be >= 0, and not both 0")
    if args.out.exists() and not args.force:
        fail(f"{args.out.name} exists (--force to overwrite)")
    quiet_libraries()
    from sdserve.engine.preview_fit import PreviewFitConfig, fit_preview

    config = PreviewFitConfig(model=args.model, generated=args.generated, rendered=args.rendered, steps=args.steps,
                              kernel=args.kernel, hidden=args.hidden, iterations=args.iterations, seed=args.seed)
    try:
        decoder, report = fit_preview(config)
    except SdserveError as exc:
        fail_on(exc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = args.out.with_name(f".{args.out.name}.tmp")
    decoder.save(staging, {k: json.dumps(v) for k, v in report.items()})
    staging.replace(args.out)  # whole or not at all
    print(f"{args.out}  mean abs error {report['train_mae_255']:.1f}/255 on the fit's images "
          f"(SD's fixed factors: {report['train_mae_255_sd_factors']:.1f}/255)")

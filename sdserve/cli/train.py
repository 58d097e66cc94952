"""`sdserve train base ...`: train the embedded shapes base model (see sdserve/trainers/base_model.py).

The lead's `sdserve.cli.main` calls `register(subparsers)`; `python -m sdserve.cli.train base ...`
runs the same parser standalone.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from sdserve.models.shapes.components import ComponentSizes

VAE_SHARE = 0.2  # of --minutes; the VAE plateaus long before the UNet does


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    train = subparsers.add_parser("train", help="train models and adapters")
    kinds = train.add_subparsers(dest="train_kind", required=True)
    base = kinds.add_parser("base", help="train the base model on a synthetic world")
    base.add_argument("--world", default="shapes", choices=["shapes"])
    base.add_argument("--out", type=Path, required=True, help="output pipeline directory")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--minutes", type=float, default=57.0, help="total wall-clock budget")
    base.add_argument("--vae-minutes", type=float, help=f"VAE budget (default {VAE_SHARE:.0%}% of --minutes)")
    base.add_argument("--unet-minutes", type=float, help="UNet budget (default: the rest of --minutes)")
    base.add_argument("--vae-max-steps", type=int)
    base.add_argument("--unet-max-steps", type=int)
    base.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    base.add_argument("--vae-downsample", type=int, default=4, choices=[4, 8])
    base.add_argument("--vae-batch", type=int, default=16)
    base.add_argument("--unet-batch", type=int, default=64)
    base.add_argument("--unet-lr", type=float, default=1e-3)
    base.add_argument("--edge-weight", type=float, default=16.0,
                      help="VAE loss weight of pixels on shape outlines (1: none)")
    default_channels = ",".join(str(c) for c in ComponentSizes().unet_channels)
    base.add_argument("--unet-channels", default=default_channels, help="three comma-separated widths")
    base.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    base.add_argument("--tiny", action="store_true", help="test-sized networks")
    base.add_argument("--no-progress", action="store_true")
    base.set_defaults(func=run_base)
    return train


def config_from_args(args: argparse.Namespace):
    from sdserve.trainers.base_model import TrainConfig  # torch/diffusers load only when training

    if args.tiny:
        sizes = ComponentSizes.tiny()
    else:
        sizes = ComponentSizes(unet_channels=tuple(int(c) for c in args.unet_channels.split(",")))
    sizes = replace(sizes, vae_downsample=args.vae_downsample)
    vae_minutes = args.vae_minutes if args.vae_minutes is not None else args.minutes * VAE_SHARE
    unet_minutes = args.unet_minutes if args.unet_minutes is not None else args.minutes - vae_minutes
    return TrainConfig(
        out=args.out,
        world=args.world,
        seed=args.seed,
        vae_minutes=vae_minutes,
        unet_minutes=unet_minutes,
        vae_max_steps=args.vae_max_steps,
        unet_max_steps=args.unet_max_steps,
        resume=args.resume,
        sizes=sizes,
        vae_batch=args.vae_batch,
        unet_batch=args.unet_batch,
        unet_lr=args.unet_lr,
        edge_weight=args.edge_weight,
        threads=args.threads,
        progress=not args.no_progress,
    )


def run_base(args: argparse.Namespace) -> int:
    from sdserve.trainers.base_model import train_base

    out = train_base(config_from_args(args))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

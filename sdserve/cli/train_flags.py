"""The flags and the ending every `sdserve train METHOD` on the shared loop has in common (one
definition: cli/train.py, cli/train_controlnet.py and cli/train_ip_adapter.py register from here).
No heavy imports at module level (`sdserve --help` stays fast)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def unet_groups(text: str) -> tuple[str, ...]:
    """--targets: comma-separated UNet module groups."""
    return tuple(group.strip() for group in text.split(",") if group.strip())


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every adapter method shares: the base model, the data, the output and the loop
    (sdserve.trainers.loop.LoopConfig mirrors the loop's)."""
    parser.add_argument("--model", default="default",
                        help="base model: a built-in name (default: the embedded shapes model; see "
                             "`sdserve models list`) or a diffusers-format directory")
    parser.add_argument("--data", type=Path, required=True,
                        help="folder of training images (PNG/JPEG/WebP) with captions: NAME.txt beside "
                             "NAME.png (kohya) or a metadata.jsonl of {\"file_name\", \"text\"} lines "
                             "(diffusers imagefolder)")
    parser.add_argument("--caption", metavar="TEXT",
                        help="one caption for every --data image (instead of their own captions)")
    parser.add_argument("--mask-data", type=Path, metavar="DIR",
                        help="loss masks (kohya's masked loss): a greyscale image per --data image, same "
                             "name stem; white pixels count, black ones do not, and each image's loss is "
                             "the mask-weighted mean, so a small subject weighs as much as a large one "
                             "(`train data shapes --conditioning mask --layout imagefolder` writes them "
                             "to DIR/conditioning); --reg-data images count whole")
    parser.add_argument("--reg-data", type=Path, metavar="DIR",
                        help="regularization (class) images, same layout as --data, mixed into every "
                             "batch to keep the model's prior (kohya's reg images, DreamBooth's class images)")
    parser.add_argument("--reg-caption", metavar="TEXT",
                        help="one caption for every --reg-data image, e.g. \"a photo of a dog\"")
    parser.add_argument("--prior-loss-weight", type=float, default=1.0,
                        help="weight of the --reg-data images' loss against the --data images' (default 1)")
    parser.add_argument("--resolution", type=int,
                        help="side of the square training images in pixels; others are resized (shorter "
                             "side) and center-cropped (default: the model's native size, 64 for `default`)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the adapter file to write (.safetensors), written whole or not at all")
    add_loop_arguments(parser)


def add_loop_arguments(parser: argparse.ArgumentParser, *, lr: float = 1e-4, lr_note: str = "",
                       per_step: str = "images", resume_note: str = "") -> None:
    """The shared loop's flags (LoopConfig), one definition for every method that trains on it;
    `lr` and the notes are where methods differ."""
    parser.add_argument("--steps", type=int, default=500, help="total optimizer steps (default 500)")
    parser.add_argument("--lr", type=float, default=lr,
                        help=f"AdamW learning rate (default {lr:g}{lr_note})")
    add_lr_schedule_argument(parser)
    parser.add_argument("--batch-size", type=int, default=1, help=f"{per_step} per step (default 1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds new weights, data order, timesteps and noise: the same seed gives the same "
                             "output bytes (default 0)")
    parser.add_argument("--min-snr-gamma", type=float,
                        help="Min-SNR-γ loss weighting, e.g. 5 (default: off, plain MSE)")
    parser.add_argument("--save-every", type=int, default=0, metavar="N",
                        help="write a checkpoint every N steps (default 0: at the end and when stopped); "
                             "Ctrl-C or SIGTERM saves one at the next step boundary")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="where checkpoints go (default: OUT without .safetensors, plus .state, beside OUT)")
    parser.add_argument("--resume", type=Path, metavar="DIR",
                        help="continue from the checkpoint in DIR (a --state-dir) up to --steps; "
                             f"the result equals an uninterrupted run's{resume_note}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1; part of what makes reruns byte-identical)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_lr_schedule_argument(parser: argparse.ArgumentParser) -> None:
    """--lr-schedule (LoopConfig.lr_schedule), also for commands that define the other loop flags themselves."""
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                        help="constant: --lr for every step (default); cosine: from --lr down to 0 at --steps "
                             "along half a cosine")


def loop_config_from_args(args: argparse.Namespace):
    from sdserve.trainers.loop import LoopConfig

    return LoopConfig(
        steps=args.steps,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        batch_size=args.batch_size,
        seed=args.seed,
        save_every=args.save_every,
        threads=args.threads,
        progress=not args.no_progress,
        resume=args.resume,
        state_dir=args.state_dir,
        prior_loss_weight=args.prior_loss_weight,
        resolution=args.resolution,
        min_snr_gamma=args.min_snr_gamma,
    )


def train_or_fail(run: Callable[[], Any]) -> Any:
    """run()'s value, or how a training command ends instead: bad input and a diverged run are one
    line and exit 2 (`fail` exits); SIGINT/SIGTERM after the checkpoint return 128 + the signal."""
    from sdserve.cli.common import fail
    from sdserve.errors import SdserveError
    from sdserve.trainers.loop import Diverged, Interrupted

    try:
        return run()
    except SdserveError as error:
        fail(str(error))
    except Diverged as stopped:
        fail(str(stopped))
    except Interrupted as stopped:
        print(f"sdserve: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:  # before the loop's handlers were installed, or a second Ctrl-C
        fail("interrupted; files already written are whole (checkpoints, never a torn --out)",
             128 + signal.SIGINT)


def last_loss(result: Any) -> str:
    return f", last loss {result.losses[-1]:.4f}" if result.losses else ""

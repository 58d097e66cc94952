"""`sdserve train controlnet` (sdserve/trainers/controlnet.py): the loop's flags, a folder of
(image, conditioning image, caption) triplets. No heavy imports at module level."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdserve.cli.train_flags import add_loop_arguments, last_loss, loop_config_from_args, train_or_fail


def register(kinds: argparse._SubParsersAction) -> None:
    """`sdserve train controlnet` (sdserve/trainers/controlnet.py): the loop's flags, a triplet folder."""
    parser = kinds.add_parser(
        "controlnet", help="train a ControlNet on (image, conditioning image, caption) triplets",
        description="Train a ControlNet initialised from the base model's UNet (ControlNetModel.from_unet: its "
                    "zero convs make step 0 the base model) on a folder laid out as diffusers' train_controlnet "
                    "example reads it: a metadata.jsonl of {\"file_name\", \"conditioning_file_name\", \"text\"} "
                    "lines. `sdserve train data shapes --conditioning mask` writes one. --out is a diffusers "
                    "ControlNet directory (config.json + diffusion_pytorch_model.safetensors), written whole, which "
                    "ControlNetModel.from_pretrained and sdserve (generate --controlnet DIR:IMAGE) load. On the embedded "
                    "`default` model, --lr 1e-3 --batch-size 8 --steps 150 learns the shapes masks (IoU 0.85-0.87 "
                    "over 5 seeds, docs/benchmarks.md); the loop's defaults (lr 1e-4, batch 1, 500 steps) reached 0.52.",
    )
    parser.add_argument("--model", default="default",
                        help="base model: a built-in name (default: the embedded shapes model; see `sdserve models "
                             "list`) or a diffusers-format directory")
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with a metadata.jsonl of {\"file_name\", \"conditioning_file_name\", \"text\"} "
                             "lines (paths relative to it); each conditioning image has its image's size")
    parser.add_argument("--caption", metavar="TEXT", help="one caption for every image (instead of the text fields)")
    parser.add_argument("--resolution", type=int,
                        help="side of the square training images in pixels; images and their conditioning images "
                             "are resized (shorter side) and center-cropped alike (default: the model's native size)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the ControlNet directory to write (new, or one this command wrote before)")
    # trainers.controlnet.EMBEDDING_INITS, spelled out here: this module imports no torch (fast --help).
    parser.add_argument("--embedding-init", choices=("gaussian", "diffusers"), default="gaussian",
                        help="initial weights of the conditioning embedding's convs (conv_out stays zero either way, "
                             "so step 0 is the base model): gaussian (default): He-normal, zero biases, which carries "
                             "the control image through them at full strength; diffusers: ControlNetModel.from_unet's "
                             "torch default, under which the control's signal fades ~3x per conv and a run can end "
                             "ignoring the control (the embedded model, lr 1e-3, seed 0 at 2 threads did, 250 steps)")
    add_loop_arguments(parser, lr_note="; diffusers' example uses 5e-6 on SD 1.5", per_step="triplets",
                       resume_note="; a checkpoint for another model family or another --embedding-init is refused")
    parser.set_defaults(func=run, prior_loss_weight=1.0)


def run(args: argparse.Namespace) -> int:
    from sdserve.cli.common import fail, quiet_libraries

    quiet_libraries()
    from sdserve.trainers.controlnet import check_output_directory, train_controlnet
    from sdserve.trainers.controlnet_data import check_control_folder, load_control_folder
    from sdserve.trainers.loop import check_loop_config, default_state_dir, load_components
    from sdserve.trainers.output import check_directory_writable

    def run() -> Any:
        cfg = loop_config_from_args(args)
        check_loop_config(cfg)
        check_output_directory(args.out)
        check_directory_writable(cfg.state_dir or default_state_dir(args.out), "--state-dir")
        if args.resume is not None and not args.resume.is_dir():
            fail(f"--resume: {args.resume} is not a directory")
        check_control_folder(args.data)  # before the model loads: a bad folder costs nothing
        components = load_components(args.model)
        resolution = args.resolution or components.resolution
        data = load_control_folder(args.data, resolution, args.caption)
        return train_controlnet(components, data, replace(cfg, resolution=resolution), args.out,
                                embedding_init=args.embedding_init)

    result = train_or_fail(run)
    if isinstance(result, int):
        return result
    print(f"wrote {result.out} (controlnet, {result.steps} steps{last_loss(result)}); checkpoint in {result.state_dir}")
    return 0

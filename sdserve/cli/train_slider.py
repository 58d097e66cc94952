"""`sdserve train slider`: a text Concept Slider (sdserve/trainers/slider.py), or with --pairs DIR
a visual one (sdserve/trainers/slider_pairs.py), on the shared loop. `cli/train.py` registers it.
No heavy imports at module level (`sdserve --help` stays fast)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdserve.cli.train_flags import (
    add_lr_schedule_argument,
    last_loss,
    loop_config_from_args,
    train_or_fail,
    unet_groups,
)


class _TextSliderFlag(argparse._StoreAction):
    """A text-slider flag: stored as usual and noted in `text_flags_given`, so that --pairs can
    refuse one that was given (even at its default value) while --help keeps the real default."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        namespace.text_flags_given = [*getattr(namespace, "text_flags_given", []), option_string]


class _TextSliderAppend(argparse._AppendAction):
    """`_TextSliderFlag` for a repeatable flag (--anchor)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        namespace.text_flags_given = [*getattr(namespace, "text_flags_given", []), option_string]


def register(kinds: argparse._SubParsersAction) -> None:
    """`sdserve train slider` (sdserve/trainers/slider.py): a text Concept Slider, no --data; with
    --pairs DIR a visual one (sdserve/trainers/slider_pairs.py)."""
    # SliderConfig's defaults, written out: its module imports torch, which `train --help` must not load.
    defaults = argparse.Namespace(eta=1.0, anchor_weight=1.0, start=0.0, pool_size=16, pool_steps=20)
    parser = kinds.add_parser(
        "slider", help="train a Concept Slider: a LoRA whose scale moves one attribute (text prompts, or "
                       "before/after image pairs with --pairs)",
        description="Train a Concept Slider (Gandikota et al. 2023). Text: a LoRA that at scale +1 moves the "
                    "model's prediction for --target along eta * (eps(target+positive) - eps(target+negative)) "
                    "of the frozen model and at -1 the other way, while --anchor prompts keep their prediction. "
                    "The latents it edits are noised samples the frozen model draws for --target (a pool made "
                    "once). Visual (--pairs DIR): DIR/before/NAME.png and DIR/after/NAME.png show one scene "
                    "without and with the attribute; both images of a pair get the same noise and timestep, and "
                    "the LoRA at +1 learns to denoise the after image, at -1 the before image (captions: "
                    "before/NAME.txt, else after/NAME.txt, else --target, else empty; --positive, --negative, "
                    "--anchor, --eta, --anchor-weight and --pool-* are text-slider flags and refused with "
                    "--pairs). The file is a LoRA (diffusers/PEFT or kohya keys) marked as a slider, with the "
                    "trained scale range and --start in its metadata; serve it at any scale, e.g. -2..2.",
    )
    parser.add_argument("--model", default="default",
                        help="base model: a built-in name (default: the embedded shapes model) or a diffusers directory")
    parser.add_argument("--pairs", type=Path, metavar="DIR",
                        help="train a visual slider from DIR/before/NAME.png and DIR/after/NAME.png (PNG, JPEG or "
                             "WebP; resized and center-cropped to the model's side as --data images are)")
    parser.add_argument("--positive", metavar="WORDS", action=_TextSliderFlag,
                        help="text slider (required without --pairs): the attribute at scale +1, e.g. \"large\"; "
                             "put after --target's article")
    parser.add_argument("--negative", metavar="WORDS", action=_TextSliderFlag,
                        help="text slider (required without --pairs): the attribute at scale -1, e.g. \"small\" "
                             "(must differ from --positive)")
    parser.add_argument("--target", action="append", metavar="PROMPT",
                        help="text slider (required; repeatable: pool samples take them in turn): prompt whose "
                             "samples the slider edits, e.g. \"a red circle\". With --pairs (once): the caption of "
                             "pairs that have no .txt")
    parser.add_argument("--anchor", action=_TextSliderAppend, metavar="PROMPT",
                        help="text slider: prompt whose prediction the slider must leave unchanged (repeatable)")
    parser.add_argument("--eta", type=float, default=defaults.eta, action=_TextSliderFlag,
                        help=f"text slider: strength of the edit direction per unit of scale (default {defaults.eta:g})")
    parser.add_argument("--anchor-weight", type=float, default=defaults.anchor_weight, action=_TextSliderFlag,
                        help=f"text slider: weight of the anchors' loss (default {defaults.anchor_weight:g})")
    parser.add_argument("--start", type=float, default=defaults.start, metavar="FRACTION",
                        help="suggested fraction of the steps after which to apply the slider, recorded in the "
                             f"metadata (default {defaults.start:g})")
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size, action=_TextSliderFlag,
                        help=f"text slider: samples of --target the frozen model draws once (default {defaults.pool_size})")
    parser.add_argument("--pool-steps", type=int, default=defaults.pool_steps, action=_TextSliderFlag,
                        help=f"text slider: sampler steps of each pool sample (default {defaults.pool_steps})")
    parser.add_argument("--batch-size", type=int,
                        help="--pairs only: pairs per step (1 when not given); the text slider takes one pool sample a step")
    parser.add_argument("--train-scale", type=float, metavar="S",
                        help="--pairs only: the LoRA at +S learns the after images, at -S the before images, and "
                             "the file records the scale range -S,S (1 when not given; 2 keeps scales -2..2 "
                             "within what was trained)")
    parser.add_argument("--rank", type=int, default=4, help="rank of every factor pair (default 4, at most 128)")
    parser.add_argument("--alpha", type=float,
                        help="scale numerator: the delta is (alpha/rank)·B·A (default: alpha = rank)")
    parser.add_argument("--targets", default="attn",
                        help="comma-separated UNet module groups: attn, ff, proj, conv (default attn)")
    parser.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers",
                        help="key layout of --out: diffusers/PEFT or kohya sd-scripts (default diffusers)")
    parser.add_argument("--out", type=Path, required=True, help="the slider file to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=500, help="total optimizer steps (default 500)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    add_lr_schedule_argument(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the initial weights, the pool or the pairs' order, timesteps and noise: the "
                             "same seed gives the same bytes (default 0)")
    parser.add_argument("--save-every", type=int, default=0, metavar="N",
                        help="write a checkpoint every N steps (default 0: at the end and when stopped)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="where checkpoints go (default: OUT without .safetensors, plus .state)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue from the checkpoint in DIR up to --steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, text_flags_given=[], prior_loss_weight=1.0, resolution=None,
                        min_snr_gamma=None)


def _slider_config(args: argparse.Namespace) -> Any:
    """The text or visual slider's config from the flags; a conflict or a missing flag exits 2 in one line."""
    from sdserve.cli.common import fail
    from sdserve.trainers.lora import LoRAConfig

    lora = LoRAConfig(rank=args.rank, alpha=args.alpha, unet_targets=unet_groups(args.targets), format=args.format)
    if args.pairs is not None:
        from sdserve.trainers.slider_pairs import PairSliderConfig

        if args.text_flags_given:
            fail(f"{args.text_flags_given[0]}: a text-slider flag; with --pairs the before/after images set the "
                 "direction (drop it, or drop --pairs)")
        if args.target is not None and len(args.target) > 1:
            fail("--target: with --pairs give it once (the caption of pairs that have no .txt)")
        args.batch_size = 1 if args.batch_size is None else args.batch_size
        scale = 1.0 if args.train_scale is None else args.train_scale
        return PairSliderConfig(batch_size=args.batch_size, scale=scale, start=args.start, lora=lora)
    from sdserve.trainers.slider import SliderConfig

    for flag in ("positive", "negative", "target"):
        if getattr(args, flag) is None:
            fail(f"--{flag}: required for a text slider (or give --pairs DIR for a visual one)")
    if args.batch_size is not None:
        fail("--batch-size: only with --pairs (the text slider takes one pool sample a step)")
    if args.train_scale is not None:
        fail("--train-scale: only with --pairs (the text slider trains at -1 and +1)")
    args.batch_size = 1
    return SliderConfig(positive=args.positive, negative=args.negative, targets=tuple(args.target),
                        anchors=tuple(args.anchor or ()), eta=args.eta, anchor_weight=args.anchor_weight,
                        start=args.start, pool_size=args.pool_size, pool_steps=args.pool_steps, lora=lora)


def run(args: argparse.Namespace) -> int:
    from sdserve.cli.common import fail, quiet_libraries
    from sdserve.errors import SdserveError

    config = _slider_config(args)
    visual = args.pairs is not None
    try:  # before the model loads: a bad flag costs nothing
        if visual:
            from sdserve.trainers.slider_pairs import check_pair_slider_config, scan_pairs

            check_pair_slider_config(config)
            scan_pairs(args.pairs)  # missing folders, lonely names, no pairs: before the model loads
        else:
            from sdserve.trainers.slider import check_slider_config

            check_slider_config(config)
    except SdserveError as error:
        fail(str(error))
    quiet_libraries()
    from sdserve.trainers.loop import check_loop_config, default_state_dir, load_components, train
    from sdserve.trainers.output import check_directory_writable, check_writable

    def run() -> Any:
        cfg = loop_config_from_args(args)
        check_loop_config(cfg)
        check_writable(args.out, "--out")
        check_directory_writable(cfg.state_dir or default_state_dir(args.out), "--state-dir")
        if args.resume is not None and not args.resume.is_dir():
            fail(f"--resume: {args.resume} is not a directory")
        components = load_components(args.model)
        if visual:
            from sdserve.trainers.slider_pairs import PairSliderMethod, load_pairs

            pairs = load_pairs(args.pairs, components.resolution, default_caption=(args.target or [""])[0])
            method = PairSliderMethod(components, config, pairs, seed=args.seed)
        else:
            from sdserve.trainers.slider import SliderMethod

            method = SliderMethod(components, config, seed=args.seed, progress=not args.no_progress)
        return train(method, components, None, cfg, args.out)

    result = train_or_fail(run)
    if isinstance(result, int):
        return result
    what = f"visual slider, {args.pairs}" if visual else "slider"
    print(f"wrote {result.out} ({what}, {result.steps} steps{last_loss(result)}); checkpoint in {result.state_dir}")
    return 0

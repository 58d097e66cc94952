"""`sdserve train base|lora ...`: train the embedded shapes base model, or an adapter on a base model.

`train base` is sdserve/trainers/base_model.py. Adapter methods share one loop
(sdserve/trainers/loop.py) and so share their flags: a method's subcommand calls
`add_adapter_arguments(parser)`, adds its own flags, and sets `func` to a function that calls
`run_adapter(args, build)` with `build(components, args) -> Method` (see `_run_lora`).

The lead's `sdserve.cli.main` calls `register(subparsers)`; `python -m sdserve.cli.train base ...`
runs the same parser standalone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdserve.cli import train_controlnet, train_data, train_ip_adapter, train_slider
from sdserve.cli.train_flags import (
    add_adapter_arguments,
    last_loss,
    loop_config_from_args,
    train_or_fail,
    unet_groups,
)

VAE_SHARE = 0.2  # of --minutes; the VAE plateaus long before the UNet does
# ComponentSizes().unet_channels, written out: its module imports diffusers, which `train --help`
# must not load (tests/cli/test_startup.py checks the two agree).
DEFAULT_UNET_CHANNELS = "32,64,128"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    train = subparsers.add_parser("train", help="train models and adapters")
    kinds = train.add_subparsers(dest="train_kind", required=True)
    base = kinds.add_parser("base", help="train the base model on a synthetic world")
    base.add_argument("--world", default="shapes", choices=["shapes"], help="the synthetic world to train on (default %(default)s)")
    base.add_argument("--out", type=Path, required=True, help="output pipeline directory")
    base.add_argument("--seed", type=int, default=0, help="the same seed trains the same weights (default %(default)s)")
    base.add_argument("--minutes", type=float, default=57.0, help="total wall-clock budget (default %(default)s)")
    base.add_argument("--vae-minutes", type=float, help=f"VAE budget (default {VAE_SHARE:.0%}% of --minutes)")
    base.add_argument("--unet-minutes", type=float, help="UNet budget (default: the rest of --minutes)")
    base.add_argument("--vae-max-steps", type=int, help="stop the VAE stage after N steps instead of by time (default: by time)")
    base.add_argument("--unet-max-steps", type=int, help="stop the UNet stage after N steps instead of by time (default: by time)")
    base.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    base.add_argument("--vae-downsample", type=int, default=4, choices=[4, 8], help="the VAE's spatial downsampling factor (default %(default)s)")
    base.add_argument("--vae-batch", type=int, default=16, help="VAE batch size (default %(default)s)")
    base.add_argument("--unet-batch", type=int, default=64, help="UNet batch size (default %(default)s)")
    base.add_argument("--unet-lr", type=float, default=1e-3, help="UNet learning rate (default %(default)s)")
    base.add_argument("--edge-weight", type=float, default=16.0,
                      help="VAE loss weight of pixels on shape outlines (1: none)")
    base.add_argument("--unet-channels", default=DEFAULT_UNET_CHANNELS, help=f"three comma-separated widths (default {DEFAULT_UNET_CHANNELS})")
    base.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    base.add_argument("--tiny", action="store_true", help="test-sized networks")
    base.add_argument("--no-progress", action="store_true", help="no progress bar")
    base.set_defaults(func=run_base)
    _register_lora(kinds)
    _register_dreambooth(kinds)
    _register_textual_inversion(kinds)
    _register_hypernetwork(kinds)
    train_slider.register(kinds)  # `sdserve train slider` (cli/train_slider.py)
    train_controlnet.register(kinds)  # `sdserve train controlnet` (cli/train_controlnet.py)
    train_ip_adapter.register(kinds)  # `sdserve train ip-adapter` (cli/train_ip_adapter.py)
    _register_decoder(kinds)
    train_data.register(kinds)  # `sdserve train data shapes`: captioned folders of the shapes world
    return train


def config_from_args(args: argparse.Namespace):
    from sdserve.models.shapes.components import ComponentSizes  # torch/diffusers load only when training
    from sdserve.trainers.base_model import TrainConfig

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


def run_adapter(args: argparse.Namespace, build: Callable[[Any, argparse.Namespace], Any]) -> int:
    """Check the cheap things, load the model and the data, build the method, train, report.

    Bad input is one line naming the file or flag, exit 2, with nothing written; a diverged run
    exits 2 naming the step; SIGINT/SIGTERM exit 128 + the signal's number after saving.
    """
    from sdserve.cli.common import fail, quiet_libraries

    quiet_libraries()
    from sdserve.trainers.data import load_folder, load_masks
    from sdserve.trainers.loop import check_loop_config, default_state_dir, load_components, train
    from sdserve.trainers.output import check_directory_writable, check_writable

    def run() -> tuple[Any, str]:
        cfg = loop_config_from_args(args)
        check_loop_config(cfg)
        check_writable(args.out, "--out")
        check_directory_writable(cfg.state_dir or default_state_dir(args.out), "--state-dir")
        for flag, folder in (("--data", args.data), ("--reg-data", args.reg_data), ("--mask-data", args.mask_data)):
            if folder is not None and not folder.is_dir():
                fail(f"{flag}: {folder} is not a directory")
        if args.resume is not None and not args.resume.is_dir():
            fail(f"--resume: {args.resume} is not a directory")
        components = load_components(args.model)
        resolution = args.resolution or components.resolution
        data = load_folder(args.data, resolution, args.caption)
        if args.mask_data is not None:
            data = load_masks(args.mask_data, data)
        reg = None
        if args.reg_data is not None:
            reg = load_folder(args.reg_data, resolution, args.reg_caption, flag="--reg-data")
        method = build(components, args)
        return train(method, components, data, replace(cfg, resolution=resolution), args.out, reg=reg), method.kind

    outcome = train_or_fail(run)
    if isinstance(outcome, int):
        return outcome
    result, kind = outcome
    print(f"wrote {result.out} ({kind}, {result.steps} steps{last_loss(result)}); checkpoint in {result.state_dir}")
    return 0


def _register_lora(kinds: argparse._SubParsersAction) -> None:
    lora = kinds.add_parser(
        "lora", help="train a LoRA on captioned images",
        description="Train a LoRA (low-rank factors on the UNet's attention, optionally the text encoder's) "
                    "on a folder of captioned images, against a base model's own noise schedule and "
                    "prediction type. The file loads in sdserve and in diffusers (load_lora_weights).",
    )
    add_adapter_arguments(lora)
    lora.add_argument("--rank", type=int, default=4, help="rank of every factor pair (default 4, at most 128)")
    lora.add_argument("--alpha", type=float,
                      help="scale numerator: the delta is (alpha/rank)·B·A (default: alpha = rank)")
    lora.add_argument("--targets", default="attn",
                      help="comma-separated UNet module groups: attn (to_q/k/v/out), ff (feed-forward), "
                           "proj (proj_in/out), conv (the ResNet blocks' 3x3 convs: LoCon) (default attn)")
    lora.add_argument("--text-encoder", action="store_true",
                      help="also train LoRA factors on the text encoders' attention (q/k/v/out_proj)")
    lora.add_argument("--init", choices=["kaiming", "gaussian"], default="kaiming",
                      help="initial down factors: kaiming-uniform (PEFT's default) or normal(0, 1/rank); "
                           "up factors start at 0, so step 0 is the base model")
    lora.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers",
                      help="key layout of --out: diffusers/PEFT (lora_A/lora_B) or kohya sd-scripts "
                           "(lora_unet_..., lora_down/lora_up, .alpha) (default diffusers)")
    lora.set_defaults(func=_run_lora)


def _lora_config(args: argparse.Namespace):
    from sdserve.trainers.lora import LoRAConfig, check_config

    config = LoRAConfig(
        rank=args.rank,
        alpha=args.alpha,
        unet_targets=unet_groups(args.targets),
        text_encoder=args.text_encoder,
        init=args.init,
        format=args.format,
    )
    check_config(config)
    return config


def _run_lora(args: argparse.Namespace) -> int:
    from sdserve.cli.common import fail
    from sdserve.errors import SdserveError
    from sdserve.trainers.lora import LoRAMethod

    try:
        config = _lora_config(args)  # before the model loads: a bad flag costs nothing
    except SdserveError as error:
        fail(str(error))
    return run_adapter(args, lambda components, a: LoRAMethod(components, config, seed=a.seed))


def _register_dreambooth(kinds: argparse._SubParsersAction) -> None:
    """`sdserve train dreambooth` (sdserve/trainers/dreambooth.py): the adapter flags, with the
    DreamBooth names of the loop's caption and regularization flags as aliases of them."""
    dreambooth = kinds.add_parser(
        "dreambooth", help="DreamBooth: teach a model one subject from a few images (full fine-tune or --lora)",
        description="Fine-tune a base model on a few images of one subject, all captioned with --instance-prompt; "
                    "with --class-prompt, images of the class generated by the base model itself are mixed into "
                    "every batch (prior preservation). --out is the pipeline directory to write (loadable by "
                    "diffusers' from_pretrained and by sdserve as a model), or with --lora the LoRA file. "
                    "Full fine-tunes usually want a much smaller --lr than LoRAs, e.g. 5e-6.",
    )
    add_adapter_arguments(dreambooth)
    dreambooth.add_argument("--instance-prompt", dest="caption", metavar="TEXT",
                            help="caption of every --data image, naming the subject by a rare token, e.g. "
                                 "\"a photo of sks dog\" (required unless --use-captions; the same as --caption)")
    dreambooth.add_argument("--use-captions", action="store_true",
                            help="caption the --data images with their own .txt / metadata.jsonl captions instead")
    dreambooth.add_argument("--class-prompt", dest="reg_caption", metavar="TEXT",
                            help="prior preservation: the class's prompt, e.g. \"a photo of dog\"; class images are "
                                 "generated from it until --class-dir holds --num-class-images (the same as --reg-caption)")
    dreambooth.add_argument("--num-class-images", type=int, metavar="N",
                            help="class images to train with, generated if fewer exist (default 100; needs --class-prompt)")
    dreambooth.add_argument("--class-dir", dest="reg_data", type=Path, metavar="DIR",
                            help="where class images are cached and reused (default: OUT.class beside OUT); without "
                                 "--class-prompt, a folder of captioned class images (the same as --reg-data)")
    dreambooth.add_argument("--lora", action="store_true",
                            help="train a LoRA (attention factors) instead of the full weights; --out is then a file")
    dreambooth.add_argument("--rank", type=int, help="with --lora: rank of every factor pair (default 4, at most 128)")
    dreambooth.add_argument("--targets", help="with --lora: comma-separated UNet module groups: attn (to_q/k/v/out), "
                                              "ff (feed-forward), proj (proj_in/out), conv (ResNet 3x3 convs) "
                                              "(default attn)")
    dreambooth.add_argument("--alpha", type=float,
                            help="with --lora: scale numerator, the delta is (alpha/rank)·B·A (default: alpha = rank)")
    dreambooth.add_argument("--text-encoder", action="store_true",
                            help="also train the text encoders (full mode: all their weights; --lora: their attention)")
    dreambooth.set_defaults(func=_run_dreambooth)


def _run_dreambooth(args: argparse.Namespace) -> int:
    from sdserve.cli.common import fail, quiet_libraries

    quiet_libraries()
    from sdserve.trainers.dreambooth import DreamBoothConfig, train_dreambooth
    from sdserve.trainers.lora import LoRAConfig

    lora_only = [flag for flag, value in (("--rank", args.rank), ("--alpha", args.alpha), ("--targets", args.targets))
                 if value is not None]
    if not args.lora and lora_only:
        fail(f"{lora_only[0]}: only with --lora")
    targets = unet_groups(args.targets or "attn")
    config = DreamBoothConfig(
        model=args.model, data=args.data, out=args.out, instance_prompt=args.caption,
        use_captions=args.use_captions, class_prompt=args.reg_caption, num_class_images=args.num_class_images,
        class_dir=args.reg_data, text_encoder=args.text_encoder, mask_dir=args.mask_data,
        lora=LoRAConfig(rank=4 if args.rank is None else args.rank, alpha=args.alpha, unet_targets=targets)
        if args.lora else None,
    )
    result = train_or_fail(lambda: train_dreambooth(config, loop_config_from_args(args)))
    if isinstance(result, int):
        return result
    what = "LoRA" if args.lora else "pipeline"
    print(f"wrote {what} {result.out} ({result.steps} steps{last_loss(result)}); checkpoint in {result.state_dir}")
    return 0


def _method_lr(parser: argparse.ArgumentParser, lr: float, why: str) -> None:
    """A method whose parameters want another learning rate than LoRA's: the default and its help."""
    parser.set_defaults(lr=lr)
    action = next(a for a in parser._actions if "--lr" in a.option_strings)
    action.help = f"AdamW learning rate (default {lr:g}: {why}); see --lr-schedule"


def _register_textual_inversion(kinds: argparse._SubParsersAction) -> None:
    """`sdserve train textual-inversion` (sdserve/trainers/textual_inversion.py)."""
    parser = kinds.add_parser(
        "textual-inversion", help="train a textual-inversion embedding: a new word for what the images show",
        description="Learn --num-vectors token vectors for a new word --token from captioned images whose "
                    "captions name it (\"a large <teal> circle\"); only those vectors train, the model is "
                    "unchanged. The file loads in sdserve (generate --embedding FILE) and in diffusers "
                    "(load_textual_inversion); SDXL models get both text encoders' vectors (clip_l/clip_g).",
    )
    add_adapter_arguments(parser)
    _method_lr(parser, 5e-3, "token vectors move little per step at LoRA's rate; A1111's embedding default")
    parser.add_argument("--token", required=True,
                        help="the new word prompts will use, e.g. \"<teal>\"; it must not be in the model's "
                             "vocabulary, and every --data caption must contain it")
    parser.add_argument("--init-token", required=True, metavar="WORD",
                        help="a word close to the concept, e.g. blue; every vector starts as its token row "
                             "(the mean of its rows when the tokenizer splits it)")
    parser.add_argument("--num-vectors", type=int, default=1, metavar="K",
                        help="vectors the token stands for, 1 to 75 (default 1); each takes one of the "
                             "prompt's 75 token positions")
    parser.set_defaults(func=_run_textual_inversion)


def _run_textual_inversion(args: argparse.Namespace) -> int:
    from sdserve.cli.common import fail
    from sdserve.errors import SdserveError
    from sdserve.trainers.textual_inversion import (
        TextualInversionConfig,
        TextualInversionMethod,
        check_config,
    )

    config = TextualInversionConfig(token=args.token, init_token=args.init_token, num_vectors=args.num_vectors)
    try:
        check_config(config)  # before the model loads: a bad flag costs nothing
    except SdserveError as error:
        fail(str(error))
    return run_adapter(args, lambda components, a: TextualInversionMethod(components, config))


def _register_hypernetwork(kinds: argparse._SubParsersAction) -> None:
    """`sdserve train hypernetwork` (sdserve/trainers/hypernetwork.py)."""
    parser = kinds.add_parser(
        "hypernetwork", help="train an A1111-style hypernetwork (MLPs on the attention contexts)",
        description="Train a pair of small MLPs (k, v) per attention context width, applied as A1111 applies "
                    "them: k = to_k(c + mlp_k(c)), v = to_v(c + mlp_v(c)), in self- and cross-attention. The "
                    "MLPs start with a zero output (step 0 is the base model). The file is sdserve's "
                    "hypernetwork layout (generate --hypernetwork FILE[:STRENGTH]).",
    )
    add_adapter_arguments(parser)
    parser.add_argument("--layer-structure", default="1,2,1", metavar="S0,S1,...",
                        help="MLP layer widths as multiples of the context width, starting and ending with 1 "
                             "(default 1,2,1: one hidden layer twice as wide)")
    parser.add_argument("--activation", default="linear",
                        help="activation after each layer but the last: linear (none), relu, leakyrelu, elu, "
                             "swish, tanh, sigmoid, gelu, silu, mish, ... (A1111's names; default linear)")
    parser.add_argument("--layer-norm", action="store_true", help="a LayerNorm after every layer (A1111's option)")
    parser.add_argument("--activate-output", action="store_true",
                        help="apply the activation after the last layer too")
    parser.set_defaults(func=_run_hypernetwork)


def _run_hypernetwork(args: argparse.Namespace) -> int:
    from sdserve.cli.common import fail
    from sdserve.errors import SdserveError
    from sdserve.trainers.hypernetwork import (
        HypernetworkConfig,
        HypernetworkMethod,
        check_config,
        parse_layer_structure,
    )

    try:  # before the model loads: a bad flag costs nothing
        config = HypernetworkConfig(layer_structure=parse_layer_structure(args.layer_structure),
                                    activation=args.activation, layer_norm=args.layer_norm,
                                    activate_output=args.activate_output)
        check_config(config)
    except SdserveError as error:
        fail(str(error))
    return run_adapter(args, lambda components, a: HypernetworkMethod(components, config, seed=a.seed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())


def _register_decoder(kinds: argparse._SubParsersAction) -> None:
    """`sdserve train decoder` (sdserve/trainers/decoder.py)."""
    from sdserve.trainers.decoder import DecoderConfig  # a dataclass: cheap, and the defaults' source

    defaults = DecoderConfig()
    parser = kinds.add_parser(
        "decoder", help="widen a shapes-world model's VAE decoder to teal, stars and outlines",
        description="Fine-tune the VAE decoder of a shapes-world model (such as one `train base` wrote) on scenes "
                    "mixing its own world with the extras adapters teach (teal, stars, outlined shapes), the "
                    "encoder frozen: every image keeps its latents, so the UNet keeps its meaning, and the decoder "
                    "learns to draw what a LoRA, an embedding or a hypernetwork asks of it. Writes a new model "
                    "directory (the base one is never written) and prints what the round trip reads before and "
                    "after.",
    )
    parser.add_argument("--model", default="default", help="base model: a built-in name or a directory (default: "
                        "the embedded default model)")
    parser.add_argument("--out", type=Path, required=True, help="output model directory (new, or one this "
                        "command wrote before)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch, help=f"scenes per step (default "
                        f"{defaults.batch})")
    parser.add_argument("--extra-share", type=float, default=defaults.extra_share,
                        help="share of scenes drawn with the extras; the rest are the base world "
                             f"(default {defaults.extra_share})")
    parser.add_argument("--anchors", type=int, default=defaults.anchor_count,
                        help="samples of the model on base-world prompts whose old decoding the new decoder "
                             f"keeps, so the model draws what it drew (0: none; default {defaults.anchor_count})")
    parser.add_argument("--anchor-weight", type=float, default=defaults.anchor_weight,
                        help=f"weight of the anchors' loss (default {defaults.anchor_weight})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the data and the noise: the same "
                        "seed gives the same bytes on one CPU kind (default 0)")
    parser.add_argument("--reach-scenes", type=int, default=defaults.reach_scenes,
                        help="scenes per reading of what the round trip reads back, printed before and after "
                             f"(default {defaults.reach_scenes})")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_decoder)


def _run_decoder(args: argparse.Namespace) -> int:
    from sdserve.trainers.decoder import DecoderConfig, train_decoder

    config = DecoderConfig(steps=args.steps, lr=args.lr, batch=args.batch_size, extra_share=args.extra_share,
                           anchor_count=args.anchors, anchor_weight=args.anchor_weight, seed=args.seed,
                           reach_scenes=args.reach_scenes, threads=args.threads, progress=not args.no_progress)
    out, before, after = train_or_fail(lambda: train_decoder(args.model, args.out, config))
    print(f"wrote {out} (decoder, {config.steps} steps)")
    for key in before:
        print(f"  round trip {key}: {before[key]:.2f} -> {after[key]:.2f}")
    return 0

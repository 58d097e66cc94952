"""`sdserve train ip-adapter` (sdserve/trainers/ip_adapter.py): the loop's flags, a captioned folder,
and the frozen image encoder it trains over (built here unless --image-encoder names one).

Its own module because cli/train.py is past the size CONVENTIONS asks files to stay under; train.py
registers it. No heavy imports at module level (`sdserve --help` stays fast).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdserve.cli.train_flags import add_loop_arguments, last_loss, loop_config_from_args, train_or_fail


def register(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser(
        "ip-adapter", help="train an IP-Adapter (image prompt) on captioned images",
        description="Train an IP-Adapter's image projection and decoupled cross-attention k/v (to_k_ip/to_v_ip) "
                    "on captioned images, each image its own reference, captions and images dropped at random "
                    "(the IP-Adapter paper), over a frozen image encoder: --image-encoder DIR, or one built first "
                    "(a tiny CLIPVisionModelWithProjection trained --encoder-steps on the shapes world's colour, "
                    "kind, background and position; no downloads). --out is a directory holding "
                    "ip_adapter.safetensors and image_encoder/, written whole, which diffusers' load_ip_adapter "
                    "and sdserve (generate --ip-adapter DIR:IMAGE) load.",
    )
    parser.add_argument("--model", default="default",
                        help="base model: a built-in name (default: the embedded shapes model; see `sdserve models "
                             "list`) or a diffusers-format directory")
    parser.add_argument("--data", type=Path, required=True,
                        help="folder of training images (PNG/JPEG/WebP) with captions: NAME.txt beside NAME.png "
                             "(kohya) or a metadata.jsonl of {\"file_name\", \"text\"} lines (diffusers imagefolder); "
                             "each image is also its own reference image")
    parser.add_argument("--caption", metavar="TEXT", help="one caption for every image (instead of their own)")
    parser.add_argument("--resolution", type=int,
                        help="side of the square training images in pixels; others are resized (shorter side) and "
                             "center-cropped (default: the model's native size, 64 for `default`)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the IP-Adapter directory to write (new, or one this command wrote before)")
    parser.add_argument("--image-encoder", type=Path, metavar="DIR",
                        help="a CLIPVisionModelWithProjection directory to train over, frozen (e.g. an earlier "
                             "run's OUT/image_encoder); default: build one (--encoder-steps), saved in the state dir")
    parser.add_argument("--encoder-steps", type=int, default=300, metavar="N",
                        help="steps of the built encoder's attribute objective (default 300; 0: a random encoder)")
    parser.add_argument("--num-tokens", type=int, default=4, help="image tokens per reference (default 4, the paper's)")
    parser.add_argument("--dropout", type=float, default=0.05, metavar="P",
                        help="probability of each of: caption dropped, image dropped, both (default 0.05, the paper's)")
    add_loop_arguments(parser, lr=1e-3, lr_note="; the paper's 1e-4 is for SD 1.5 over days",
                       resume_note=", with the encoder saved there")
    parser.set_defaults(func=run, prior_loss_weight=1.0)


def _encoder(args: argparse.Namespace, state_dir: Path):
    """--image-encoder, else the one a resumed run built (in its state dir), else a new one saved there."""
    from sdserve.trainers.ip_adapter_encoder import ENCODER_DIR, EncoderConfig, build_encoder, load_encoder

    if args.image_encoder is not None:
        return load_encoder(args.image_encoder)
    saved = (args.resume or state_dir) / ENCODER_DIR
    if args.resume is not None and saved.is_dir():
        return load_encoder(saved)
    encoder, accuracy = build_encoder(EncoderConfig(steps=args.encoder_steps), seed=args.seed)
    encoder.save_pretrained(state_dir / ENCODER_DIR)
    if not args.no_progress:
        print(f"image encoder: {args.encoder_steps} steps, attribute accuracy {accuracy:.2f} on held-out scenes")
    return encoder


def _native_resolution(model: str) -> int:
    """The model's native pixel side (unet sample_size x VAE scale), from its configs alone."""
    from sdserve.engine.model import read_model_info
    from sdserve.errors import InvalidArgument, NotFound
    from sdserve.trainers.components import resolve_model

    path = resolve_model(model)
    try:
        info = read_model_info(model, path)
    except NotFound as error:
        raise InvalidArgument(f"{path}: {error.message}", field="--model") from None
    return int(info.unet_config.get("sample_size", 64)) * info.vae_scale_factor


def run(args: argparse.Namespace) -> int:
    from sdserve.cli.common import fail, quiet_libraries

    quiet_libraries()
    from sdserve.trainers.data import load_folder
    from sdserve.trainers.ip_adapter import (
        IPAdapterConfig,
        check_config,
        check_output_directory,
        train_ip_adapter,
    )
    from sdserve.trainers.loop import check_loop_config, default_state_dir, load_components
    from sdserve.trainers.output import check_directory_writable

    def run_training() -> Any:
        cfg = loop_config_from_args(args)
        check_loop_config(cfg)
        config = IPAdapterConfig(num_tokens=args.num_tokens, dropout=args.dropout)
        check_config(config)
        if args.encoder_steps < 0:
            fail(f"--encoder-steps: must be >= 0 (got {args.encoder_steps})")
        check_output_directory(args.out)
        state_dir = cfg.state_dir or default_state_dir(args.out)
        check_directory_writable(state_dir, "--state-dir")
        for flag, folder in (("--data", args.data), ("--resume", args.resume), ("--image-encoder", args.image_encoder)):
            if folder is not None and not folder.is_dir():
                fail(f"{flag}: {folder} is not a directory")
        # The folder is read before the model's weights load (a bad folder costs nothing): the native
        # side comes from the model's configs.
        data = load_folder(args.data, args.resolution or _native_resolution(args.model), args.caption)
        if len(data) == 0:
            fail("--data: holds no images")
        encoder = _encoder(args, state_dir)
        components = load_components(args.model)
        return train_ip_adapter(components, data, encoder, replace(cfg, resolution=data.resolution, state_dir=state_dir),
                                args.out, config)

    result = train_or_fail(run_training)
    if isinstance(result, int):
        return result
    print(f"wrote {result.out} (ip_adapter, {result.steps} steps{last_loss(result)}); checkpoint in {result.state_dir}")
    return 0

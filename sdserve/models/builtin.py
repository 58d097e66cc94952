"""Built-in models: made by sdserve's own code, deterministically, with no network.

`builtin_path(name)` returns a diffusers-format directory that stock diffusers loads. A model
that ships trained weights in the package (`sdserve/models/weights/<name>/`) is used as is;
the others are built from their `BuiltinSpec` on first use into the cache
(`$SDSERVE_HOME/models`, default `~/.cache/sdserve/models`), atomically, so two processes
building at once never see half a directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from sdserve.models.configs import BUILTIN_SPECS, BuiltinSpec
from sdserve.paths import cache_root

SHIPPED_DIR = Path(__file__).parent / "weights"
METADATA_FILE = "sdserve.json"

# Words the random tiny models' tokenizers keep whole; other text still tokenizes byte by byte.
BASIC_WORDS = ["a", "an", "the", "of", "on", "in", "at", "and", "with", "photo", "painting", "drawing", "of", "cat", "dog", "house", "tree", "car", "sky", "sea", "mountain", "city", "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "small", "large", "circle", "square", "triangle", "left", "right", "top", "bottom", "center", "background", "blurry", "ugly", "bad", "quality"]


def builtin_names() -> list[str]:
    return list(BUILTIN_SPECS)


def builtin_path(name: str, *, build: bool = True) -> Path:
    """Directory of built-in model `name`, building it first if needed. KeyError if unknown."""
    spec = BUILTIN_SPECS[name]
    shipped = SHIPPED_DIR / name
    if (shipped / "model_index.json").exists():
        return shipped
    if spec.shipped:
        raise FileNotFoundError(
            f"the weights of built-in model {name!r} are missing from {shipped}; reinstall sdserve "
            f"(they are part of the package) or train them with `sdserve train base`"
        )
    target = cache_root() / "models" / f"{name}-v{spec.version}"
    if (target / METADATA_FILE).exists() or not build:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_model(spec, staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its directory is identical (same seed, same code).
            if not (target / METADATA_FILE).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _text_encoder(cfg: dict, tokenizer_vocab: dict[str, int], with_projection: bool, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdserve.models.tokenizer import BOS, EOS

    config = CLIPTextConfig(
        vocab_size=len(tokenizer_vocab),
        bos_token_id=tokenizer_vocab[BOS],
        eos_token_id=tokenizer_vocab[EOS],
        pad_token_id=tokenizer_vocab[EOS],
        **cfg,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def build_model(spec: BuiltinSpec, out_dir: Path, seed: int = 0) -> None:
    """Write `spec` as a diffusers-format pipeline directory with deterministic random weights."""
    # torch, diffusers and transformers load here, not at import: `sdserve models list` and the
    # server's path lookups read only the specs and must start fast (docs/benchmarks.md).
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdserve.models.tokenizer import write_clip_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = write_clip_tokenizer(out_dir / "tokenizer", BASIC_WORDS)
    vocab = tokenizer.get_vocab()
    components: dict[str, list[str | None]] = {}

    torch.manual_seed(seed)
    UNet2DConditionModel(**spec.unet).save_pretrained(out_dir / "unet")
    torch.manual_seed(seed + 1)
    AutoencoderKL(**spec.vae).save_pretrained(out_dir / "vae")
    _text_encoder(spec.text_encoder, vocab, False, seed + 2).save_pretrained(out_dir / "text_encoder")
    scheduler = getattr(diffusers, spec.scheduler_class).from_config(spec.scheduler)
    scheduler.save_pretrained(out_dir / "scheduler")
    components.update(
        unet=["diffusers", "UNet2DConditionModel"],
        vae=["diffusers", "AutoencoderKL"],
        text_encoder=["transformers", "CLIPTextModel"],
        tokenizer=["transformers", "CLIPTokenizer"],
        scheduler=["diffusers", spec.scheduler_class],
    )
    if spec.family == "sdxl":
        assert spec.text_encoder_2 is not None
        write_clip_tokenizer(out_dir / "tokenizer_2", BASIC_WORDS)
        _text_encoder(spec.text_encoder_2, vocab, True, seed + 3).save_pretrained(out_dir / "text_encoder_2")
        components.update(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            image_encoder=[None, None],
            feature_extractor=[None, None],
        )
        pipeline_class = "StableDiffusionXLPipeline"
    else:
        components.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None])
        pipeline_class = spec.pipeline_class or "StableDiffusionPipeline"
    model_index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__, **components}
    if spec.family != "sdxl":
        model_index["requires_safety_checker"] = False
    model_index.update(spec.pipeline_config)
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2))
    write_metadata(out_dir, spec)


def write_metadata(out_dir: Path, spec: BuiltinSpec) -> None:
    meta = {
        "name": spec.name,
        "family": spec.family,
        "description": spec.description,
        "defaults": asdict(spec.defaults),
        "limits": asdict(spec.limits),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")

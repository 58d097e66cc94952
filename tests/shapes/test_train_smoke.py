"""A few training steps at tiny size: the trainer runs, resumes, and writes a stock-loadable pipeline."""

import json
from dataclasses import replace

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from sdserve.models.shapes.components import ComponentSizes
from sdserve.trainers.base_model import TrainConfig, train_base


def _config(out, vae_steps: int, unet_steps: int) -> TrainConfig:
    return TrainConfig(
        out=out,
        seed=0,
        vae_max_steps=vae_steps,
        unet_max_steps=unet_steps,
        sizes=ComponentSizes.tiny(),
        vae_batch=4,
        unet_batch=4,
        pool_size=16,
        pool_refresh=2,
        eval_scenes=16,
        warmup_steps=1,
        unet_lr=1e-2,
        ema_decay=0.0,  # ship the last weights, so a few steps visibly move the output
        progress=False,
    )


def _sample(path) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a small red circle on the left on a white background",
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images  # [1, 64, 64, 3]


def test_training_changes_output_and_resumes(tmp_path):
    untrained = train_base(_config(tmp_path / "untrained", 0, 0))
    trained = train_base(_config(tmp_path / "trained", 2, 3))
    index = json.loads((trained / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False

    before, after = _sample(untrained), _sample(trained)
    assert before.shape == after.shape == (1, 64, 64, 3)
    assert np.abs(before - after).max() > 1e-3

    # Resuming with a larger step budget continues from the checkpoint (step 3 -> 4), not from 0.
    train_base(replace(_config(trained, 2, 4), resume=True))
    steps = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert torch.load(trained / "checkpoints" / "unet.pt", weights_only=True)["step"] == 4
    assert any("config" in s for s in steps)


def test_same_seed_same_weights(tmp_path):
    """A rerun with the recorded seed and step counts gives the same weights, bit for bit."""
    first = train_base(_config(tmp_path / "a", 2, 3))
    second = train_base(_config(tmp_path / "b", 2, 3))
    for part in ("unet", "vae", "text_encoder"):
        (weights_a,) = (first / part).glob("*.safetensors")
        (weights_b,) = (second / part).glob("*.safetensors")
        assert weights_a.read_bytes() == weights_b.read_bytes(), part

"""`sdserve train decoder`: only the decoder changes (the encoder, so every latent, and the UNet and
text encoder stay byte-identical), the base directory is never written, the same seed gives the
same bytes, the model serves, and bad input is one line, exit 2, with nothing written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from sdserve.models.builtin import builtin_path
from sdserve.models.shapes.world import ALL_COLORS, COLORS, KINDS
from sdserve.trainers.decoder import DecoderConfig, anchor_latents, wide_scenes, widen_decoder
from tests.trainers.conftest import run_cli

FAST = ["--steps", "2", "--batch-size", "2", "--anchors", "2", "--reach-scenes", "4", "--no-progress"]


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def widened(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """Two runs with the same seed on the embedded default model, and the base's digests before."""
    from sdserve.cli.main import main

    work = tmp_path_factory.mktemp("decoder")
    base_before = _digests(builtin_path("default"))
    outs = [work / "wide-a", work / "wide-b"]
    for out in outs:
        assert main(["train", "decoder", "--model", "default", "--out", str(out), *FAST]) == 0
    return outs[0], outs[1], base_before


def test_only_the_decoder_changes_and_the_base_is_never_written(widened):
    out, _, base_before = widened
    base = builtin_path("default")
    assert _digests(base) == base_before
    ours, theirs = _digests(out), _digests(base)
    same = {k for k in theirs if ours.get(k) == theirs[k]}
    assert "unet/diffusion_pytorch_model.safetensors" in same
    assert "text_encoder/model.safetensors" in same
    assert ours["vae/diffusion_pytorch_model.safetensors"] != theirs["vae/diffusion_pytorch_model.safetensors"]
    tuned = AutoencoderKL.from_pretrained(out, subfolder="vae").state_dict()
    original = AutoencoderKL.from_pretrained(base, subfolder="vae").state_dict()
    frozen = [k for k in original if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(tuned[k], original[k]) for k in frozen)
    assert sum(not torch.equal(tuned[k], original[k]) for k in original if k.startswith("decoder.")) > 10
    assert "_name_or_path" not in json.loads((out / "vae" / "config.json").read_text())  # no local path
    meta = json.loads((out / "sdserve.json").read_text())
    assert meta["name"] == out.name and meta["training"]["sdserve_method"] == "decoder"
    assert meta["defaults"] == json.loads((base / "sdserve.json").read_text())["defaults"]


def test_same_seed_same_bytes(widened):
    first, second, _ = widened
    assert _digests(first)["vae/diffusion_pytorch_model.safetensors"] == \
        _digests(second)["vae/diffusion_pytorch_model.safetensors"]


def test_the_widened_model_serves(widened):
    from sdserve.engine import Engine, EngineConfig, RequestSpec

    engine = Engine(EngineConfig(device="cpu", dtype="float32"))
    spec = dict(prompt="a large red circle on the left on a white background", seed=3, steps=4)
    wide, base = engine.generate([engine.validate(RequestSpec(model=str(widened[0]), **spec)),
                                  engine.validate(RequestSpec(model="default", **spec))])
    assert wide.images[0].shape == base.images[0].shape == (64, 64, 3)
    assert not np.array_equal(wide.images[0], base.images[0])  # its own decoder drew it


def test_scenes_mix_the_base_world_with_the_extras():
    rng = np.random.default_rng(0)
    scenes = wide_scenes(rng, 400, extra_share=0.5)
    shapes = [shape for scene in scenes for shape in scene.shapes]
    assert {s.color for s in shapes} == set(ALL_COLORS)
    assert {s.kind for s in shapes} >= {"star", "circle"} and {s.style for s in shapes} == {"filled", "outlined"}
    assert {scene.background for scene in scenes} <= set(COLORS)  # backgrounds stay base colours
    # With no extras, only the base vocabulary, filled, as the base model's training draws it.
    base = [shape for scene in wide_scenes(rng, 200, extra_share=0.0) for shape in scene.shapes]
    assert {s.color for s in base} <= set(COLORS) and {s.kind for s in base} == set(KINDS)
    assert {s.style for s in base} == {"filled"}


def test_anchors_keep_what_the_old_decoder_drew_from_the_unets_samples():
    """The anchors are the UNet's own samples, the same for a seed, and their loss holds the
    decoder's drawing of them near the old one where the data alone moves it."""

    path = builtin_path("default")
    anchors = anchor_latents(path, 4, seed=0, threads=1, progress=False)  # [4, 4, 16, 16]
    assert anchors.shape == (4, 4, 16, 16) and torch.isfinite(anchors).all()
    assert torch.equal(anchors, anchor_latents(path, 4, seed=0, threads=1, progress=False))

    def drift(anchor_weight: float) -> float:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval()
        scaled = anchors / vae.config.scaling_factor
        with torch.no_grad():
            before = vae.decode(scaled).sample  # [4, 3, 64, 64]
        config = DecoderConfig(steps=4, lr=3e-3, batch=2, extra_share=1.0, anchor_count=4, anchor_batch=4,
                               anchor_weight=anchor_weight, warmup_steps=1, progress=False)
        widen_decoder(vae, config, anchors)
        with torch.no_grad():
            return float(((vae.decode(scaled).sample - before) ** 2).mean())

    free, anchored = drift(0.0), drift(50.0)
    assert free > 0 and anchored < 0.5 * free, (free, anchored)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--model", "tiny-sd1"], "--model"),
        (["--steps", "0"], "--steps"),
        (["--extra-share", "1.5"], "--extra-share"),
        (["--lr", "nan"], "--lr"),
        (["--anchors", "-1"], "--anchors"),
        (["--anchor-weight", "inf"], "--anchor-weight"),
    ],
)
def test_bad_flags_are_one_line_exit_2(capsys, tmp_path, flags, named):
    out = tmp_path / "wide"
    code, _, stderr = run_cli(capsys, "train", "decoder", "--out", str(out), *FAST, *flags)
    assert code == 2 and named in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unusable_outputs_are_one_line_exit_2(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for out in (a_file, foreign, builtin_path("default"), tmp_path / "missing" / "wide"):
        code, _, stderr = run_cli(capsys, "train", "decoder", "--out", str(out), *FAST)
        assert code == 2 and "--out" in stderr and len(stderr.strip().splitlines()) == 1, (out, stderr)
    assert (foreign / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "file", "foreign"]

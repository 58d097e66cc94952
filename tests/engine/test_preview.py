"""Stream previews: the default model's fitted decoder beats SD's fixed factors on held-out images,
the engine's previews come from it, and the choice falls back as engine/preview.py says."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdserve.engine import Engine, EngineConfig
from sdserve.engine import engine as engine_module
from sdserve.engine.preview import (
    PREVIEW_FILE,
    FittedPreview,
    choose_preview_decoder,
    preview_decoder,
    sd_factors_preview,
)
from sdserve.engine.preview_fit import PreviewData, fit_linear, mean_abs_error, preview_data
from sdserve.models.builtin import builtin_path


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(max_batch_rows=16))


def test_fitted_decoder_beats_the_fixed_factors_on_held_out_images(engine):
    shipped = builtin_path("default") / PREVIEW_FILE
    assert shipped.is_file()
    # Seed 777: captions, scenes and noise none of which the shipped fit (seed 0) saw.
    held_out = preview_data(engine, "default", generated=2, rendered=6, seed=777, steps=6)
    fitted = mean_abs_error(FittedPreview.load(shipped), held_out)
    fixed = mean_abs_error(sd_factors_preview, held_out)
    assert fitted < 0.35 * fixed, (fitted, fixed)  # measured 0.11-0.19x (docs/benchmarks.md)


def test_stream_previews_come_from_the_fitted_decoder(engine, monkeypatch):
    from sdserve.api.types import RequestSpec

    model = engine.models.get("default")
    chosen = preview_decoder(model)
    assert chosen.kind == "fitted"
    seen = []

    def recording(model_, latents):
        image = engine_module.__dict__["_real_model_preview"](model_, latents)
        seen.append((latents.clone(), image))
        return image

    monkeypatch.setitem(engine_module.__dict__, "_real_model_preview", engine_module.model_preview)
    monkeypatch.setattr(engine_module, "model_preview", recording)
    events = []
    request = engine.validate(RequestSpec(model="default", prompt="a red circle", seed=1, steps=4, preview_every=1))
    engine.observers.append(lambda event: events.append(event) if event.preview is not None else None)
    try:
        engine.generate([request])
    finally:
        engine.observers.pop()
    assert len(events) == 3 and len(seen) == 3  # steps 1..3 (none with the result)
    fitted = FittedPreview.load(builtin_path("default") / PREVIEW_FILE)
    for event, (latents, image) in zip(events, seen):
        assert event.preview.shape == (16, 16, 3)
        assert np.array_equal(event.preview, image) and np.array_equal(image, fitted(latents))
        assert not np.array_equal(image, sd_factors_preview(latents))


def test_least_squares_recovers_a_known_linear_map():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=generator)  # [N, C, h, w]
    weight = torch.randn(4 * 9 + 1, 3, generator=generator) * 0.01  # [C·k·k + 1, 3]: no pixel clips
    weight[-1] = 0.5  # the bias: mid-grey
    truth = FittedPreview((weight,), 3, 4)
    targets = np.stack([truth(z) for z in latents])  # uint8 [N, h, w, 3]
    fitted = fit_linear(PreviewData(latents, targets), kernel=3, ridge=0.0)
    assert mean_abs_error(fitted, PreviewData(latents, targets)) < 0.6  # rounding to uint8 only
    assert torch.allclose(fitted.weights[0], weight, atol=2e-3)


def _fake_model(path: Path, decoder_params: int) -> SimpleNamespace:
    decoder = torch.nn.Linear(decoder_params // 1000, 1000, bias=False, device="meta")  # counted, never allocated
    return SimpleNamespace(info=SimpleNamespace(path=str(path)),
                           vae=SimpleNamespace(config=SimpleNamespace(latent_channels=4), decoder=decoder))


def test_choice_falls_back_from_fitted_to_vae_to_factors(engine, tmp_path):
    assert choose_preview_decoder(_fake_model(tmp_path, 50_000_000)).kind == "sd-factors"
    FittedPreview((torch.zeros(37, 3),), 3, 4).save(tmp_path / PREVIEW_FILE, {})
    assert choose_preview_decoder(_fake_model(tmp_path / "elsewhere", 50_000_000)).kind == "sd-factors"
    assert choose_preview_decoder(_fake_model(tmp_path, 50_000_000)).kind == "fitted"
    # A model dir without the file whose VAE decoder is small (the default's, ~1 M parameters)
    loaded = engine.models.get("default")
    model = SimpleNamespace(info=SimpleNamespace(path=str(tmp_path / "elsewhere")), vae=loaded.vae,
                            vae_dtype=loaded.vae_dtype)
    chosen = choose_preview_decoder(model)
    assert chosen.kind == "vae"
    latents = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(3))
    from sdserve.engine.decode import decode_latents

    full = torch.from_numpy(decode_latents(loaded, latents[None])[0]).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    want = torch.nn.functional.avg_pool2d(full, full.shape[-1] // 16)[0].permute(1, 2, 0).round()
    assert np.abs(chosen(latents).astype(int) - want.numpy().astype(int)).max() <= 1


@pytest.mark.slow  # ~5 s: an engine of its own loads tiny-sd1
def test_fit_preview_command_writes_a_decoder_that_loads(tmp_path, capsys):
    from sdserve.cli.main import main

    out = tmp_path / "preview.safetensors"
    argv = ["models", "fit-preview", "--model", "tiny-sd1", "--out", str(out), "--generated", "1", "--rendered", "3",
            "--steps", "2", "--hidden", "0"]
    assert main(argv) == 0
    decoder = FittedPreview.load(out)
    assert (decoder.kernel, decoder.channels, decoder.hidden) == (3, 4, 0)
    assert "mean abs error" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:  # never overwritten without --force
        main(argv)
    assert info.value.code == 2 and "exists (--force to overwrite)" in capsys.readouterr().err

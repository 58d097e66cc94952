"""save_lora round-trips: what is saved loads back to the same factors and scales."""

from __future__ import annotations

import pytest
import safetensors
import torch

from sdserve.adapters import load_lora, save_lora
from tests.adapters.lora_factory import write_lora


@pytest.mark.parametrize("family", ["sd15", "sdxl"], indirect=True)
@pytest.mark.parametrize("layout", ["peft", "kohya"])
@pytest.mark.parametrize("slider", [False, True])
def test_round_trip(family, layout, slider, tmp_path):
    _, targets, lora = family
    write_lora(lora, tmp_path / "src.safetensors", "peft")
    original = load_lora(tmp_path / "src.safetensors", "x", targets, is_slider=slider)
    save_lora(original, tmp_path / "out.safetensors", layout)
    again = load_lora(tmp_path / "out.safetensors", "x", targets)

    assert again.layout == layout and again.is_slider is slider
    assert list(again.modules) == list(original.modules)
    assert torch.equal(again.buffer, original.buffer)
    for target, module in again.modules.items():
        assert module.scale == pytest.approx(original.modules[target].scale, rel=1e-6)


def test_saved_keys_are_portable(sdxl_targets, sdxl_lora, tmp_path):
    """Text-encoder keys carry "text_model." as every other tool writes them; conv factors keep
    their 4-D shapes."""
    write_lora(sdxl_lora, tmp_path / "src.safetensors", "peft")
    adapter = load_lora(tmp_path / "src.safetensors", "x", sdxl_targets)
    save_lora(adapter, tmp_path / "k.safetensors", "kohya")
    with safetensors.safe_open(str(tmp_path / "k.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        conv = handle.get_tensor("lora_unet_conv_in.lora_down.weight") if "lora_unet_conv_in.lora_down.weight" in keys else None
        up = handle.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight")
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert conv is None or conv.ndim == 4
    assert up.shape[2:] == (1, 1)

"""SDXL original-model (sgm) block names resolve to the right diffusers modules.

The oracle is the real SDXL layout (kohya key names as found in published SDXL LoRAs); the tiny
SDXL UNet has SDXL's block structure, so the indices are the real ones.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from sdserve.adapters import load_lora
from sdserve.adapters.formats.kohya import kohya_names
from sdserve.adapters.formats.sgm import sgm_aliases

REAL_SDXL_NAMES = {
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_5_1_transformer_blocks_0_attn2_to_k": "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "input_blocks_6_0_op": "down_blocks.1.downsamplers.0.conv",
    "input_blocks_7_1_transformer_blocks_1_ff_net_2": "down_blocks.2.attentions.0.transformer_blocks.1.ff.net.2",
    "input_blocks_8_1_proj_out": "down_blocks.2.attentions.1.proj_out",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
    "middle_block_1_transformer_blocks_0_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
    "output_blocks_0_1_transformer_blocks_0_attn1_to_q": "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_1_proj_in": "up_blocks.1.attentions.2.proj_in",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
    "out_2": "conv_out",
}


def test_real_sdxl_names_resolve(sdxl_targets):
    table = kohya_names(sdxl_targets)
    for sgm_name, diffusers_path in REAL_SDXL_NAMES.items():
        assert table["lora_unet_" + sgm_name] == f"unet.{diffusers_path}", sgm_name
    # Diffusers spellings resolve too, and text encoders with and without "text_model".
    assert table["lora_unet_down_blocks_1_attentions_0_proj_in"] == "unet.down_blocks.1.attentions.0.proj_in"
    assert table["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == "text_encoder.encoder.layers.0.self_attn.q_proj"
    assert table["lora_te2_text_model_encoder_layers_1_mlp_fc2"] == "text_encoder_2.text_model.encoder.layers.1.mlp.fc2"


def test_sgm_map_is_one_to_one_and_covers_the_unet(sdxl_components):
    paths = [p for p, m in sdxl_components["unet"].named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    aliases = sgm_aliases(paths)
    assert len(set(aliases.values())) == len(aliases)
    # Everything kohya trains on the sgm UNet has an sgm name.
    assert set(aliases.values()) == set(paths)


def test_sgm_file_loads_with_locon(sdxl_targets, tmp_path):
    stem = "lora_unet_output_blocks_2_2_conv"  # up_blocks.0.upsamplers.0.conv: 64 -> 64, 3x3
    down = torch.randn(2, 64, 3, 3)  # [r, in, kh, kw]
    up = torch.randn(64, 2, 1, 1)  # [out, r, 1, 1]
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file(
        {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0)}, str(path)
    )
    module = load_lora(path, "x", sdxl_targets).modules["unet.up_blocks.0.upsamplers.0.conv"]
    assert module.scale == pytest.approx(0.5)
    torch.testing.assert_close(module.delta_weight(), 0.5 * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down))

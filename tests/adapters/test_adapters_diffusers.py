"""The factory's files (and save_lora's) load in diffusers to the same deltas sdserve loads.

diffusers is the oracle here (ARCHITECTURE rule 5): a file is loaded with
`load_lora_weights` into a pipeline built from the tiny components, and every PEFT layer's
delta is compared with sdserve's scale·B@A for that module.

Known diffusers difference: for kohya files whose alphas differ between attention modules,
diffusers 0.42 applies the most common alpha to all of them (its alpha patterns name
"attn1.processor.to_k", which matches no module); sdserve applies each module's own .alpha,
as kohya does. The kohya cases here therefore use one alpha per component.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from sdserve.adapters import load_lora, save_lora
from tests.adapters.lora_factory import (
    CLIP_ATTENTION,
    UNET_ATTENTION,
    UNET_CONV,
    FactoryLoRA,
    make_peft_lora,
    write_lora,
)


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=16,
    )


def _pipeline(components):
    parts = {name: copy.deepcopy(model) for name, model in components.items()}
    if "text_encoder_2" in parts:
        return StableDiffusionXLPipeline(
            vae=_tiny_vae(), tokenizer=None, tokenizer_2=None, scheduler=DDIMScheduler(), **parts
        )
    return StableDiffusionPipeline(
        vae=_tiny_vae(), tokenizer=None, scheduler=DDIMScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, **parts,
    )


def _diffusers_deltas(path, components) -> dict[str, torch.Tensor]:
    pipe = _pipeline(components)
    pipe.load_lora_weights(str(path), adapter_name="oracle")
    deltas = {}
    for component in components:
        for module_path, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoraLayer) and "oracle" in module.lora_A:
                deltas[f"{component}.{module_path}"] = module.get_delta_weight("oracle")
    return deltas


def _assert_same(path, components, targets):
    ours = load_lora(path, "x", targets)
    theirs = _diffusers_deltas(path, components)
    assert set(theirs) == set(ours.modules)
    for target, module in ours.modules.items():
        torch.testing.assert_close(module.delta_weight(), theirs[target], rtol=1e-5, atol=1e-6)


def _uniform_alpha_lora(components) -> FactoryLoRA:
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=6, target_modules=UNET_ATTENTION + UNET_CONV, rank_pattern={"conv1": 2}),
        "text_encoder": LoraConfig(r=3, lora_alpha=5, target_modules=CLIP_ATTENTION),
    }
    if "text_encoder_2" in components:
        configs["text_encoder_2"] = LoraConfig(r=2, lora_alpha=1, target_modules=CLIP_ATTENTION)
    return make_peft_lora(components, configs, seed=3)


CASES = [
    ("sd15", "peft", False),
    ("sd15", "peft_no_metadata", False),
    ("sd15", "peft_flat_clip", False),
    ("sd15", "kohya", False),
    ("sd15", "legacy", False),
    ("sdxl", "peft", False),
    ("sdxl", "kohya_sgm", False),
    ("sdxl", "kohya", True),
    ("sdxl", "peft_no_metadata", True),
    ("sdxl", "peft_flat_clip", True),
    ("sdxl", "legacy", True),
]


@pytest.mark.parametrize(
    ("family", "layout"),
    [pytest.param(f, layout, marks=[pytest.mark.slow] if slow else []) for f, layout, slow in CASES],
    indirect=["family"],
)
def test_factory_files_load_in_diffusers(family, layout, tmp_path):
    components, targets, mixed_lora = family
    lora = _uniform_alpha_lora(components) if layout.startswith("kohya") else mixed_lora
    path = tmp_path / f"{layout}.safetensors"
    write_lora(lora, path, layout)
    _assert_same(path, components, targets)


@pytest.mark.parametrize("family", ["sd15", "sdxl"], indirect=True)
def test_saved_files_load_in_diffusers(family, tmp_path):
    components, targets, mixed_lora = family
    write_lora(mixed_lora, tmp_path / "src.safetensors", "peft")
    save_lora(load_lora(tmp_path / "src.safetensors", "x", targets), tmp_path / "peft.safetensors", "peft")
    _assert_same(tmp_path / "peft.safetensors", components, targets)

    write_lora(_uniform_alpha_lora(components), tmp_path / "src_k.safetensors", "kohya")
    save_lora(load_lora(tmp_path / "src_k.safetensors", "x", targets), tmp_path / "kohya.safetensors", "kohya")
    _assert_same(tmp_path / "kohya.safetensors", components, targets)

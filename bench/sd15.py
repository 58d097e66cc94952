"""An SD1.5-shaped UNet with random weights, for benchmarks (no download: built from its config)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

SD15_UNET_CONFIG = {
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# The attention projections: the usual targets of style LoRAs and Concept Sliders.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)


def attention_targets(targets: dict) -> dict:
    """The UNet's attention-projection targets (`unet.<path>` -> TargetSpec)."""
    return {
        name: spec
        for name, spec in targets.items()
        if name.startswith("unet.") and any(name.endswith("." + p) for p in ATTENTION_PROJECTIONS)
    }


def random_lora_file(path, targets: dict, rank: int, seed: int, dtype=torch.float32, alpha: float | None = None):
    """Write a PEFT-layout LoRA over `targets` with random factors; -> tensor bytes written."""
    import json

    import safetensors.torch

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, spec in targets.items():
        a = torch.randn(rank, spec.a_columns, generator=generator) / spec.a_columns**0.5
        b = torch.randn(spec.out_features, rank, generator=generator) * 0.01
        tensors[f"{name}.lora_A.weight"] = a.to(dtype)
        tensors[f"{name}.lora_B.weight"] = b.to(dtype)
    config = {"r": rank, "lora_alpha": alpha or rank, "target_modules": list(ATTENTION_PROJECTIONS)}
    safetensors.torch.save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps({"unet." + k: v for k, v in config.items()})})
    return sum(t.numel() * t.element_size() for t in tensors.values())


# The usual kohya/diffusers style-LoRA set on the UNet: attention projections, the transformer
# blocks' proj_in/proj_out (1x1 convs in SD1.5) and the feed-forward layers.
STYLE_LORA_MODULES = ATTENTION_PROJECTIONS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def style_targets(targets: dict) -> dict:
    """The UNet's style-LoRA targets (`unet.<path>` -> TargetSpec)."""
    return {
        name: spec
        for name, spec in targets.items()
        if name.startswith("unet.") and any(name.endswith("." + p) for p in STYLE_LORA_MODULES)
    }


def random_peft_lora_file(path, targets: dict, rank: int, seed: int, dtype=torch.float32,
                          alpha: float | None = None) -> int:
    """Write a LoRA over `targets` as diffusers' `save_lora_weights` does: PEFT keys, conv factors
    in conv shape (A [r, in, kh, kw], B [out, r, 1, 1], which PEFT needs to load them) and the
    LoraConfig in `lora_adapter_metadata` with target_modules naming every module kind present;
    -> tensor bytes written."""
    import json

    import safetensors.torch

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, spec in targets.items():
        a = torch.randn(rank, spec.a_columns, generator=generator) / spec.a_columns**0.5
        b = torch.randn(spec.out_features, rank, generator=generator) * 0.01
        if spec.kind == "conv":
            a = a.reshape(rank, spec.in_features, *spec.kernel_size)
            b = b.reshape(spec.out_features, rank, 1, 1)
        tensors[f"{name}.lora_A.weight"] = a.to(dtype)
        tensors[f"{name}.lora_B.weight"] = b.to(dtype)
    modules = sorted({m for m in STYLE_LORA_MODULES if any(n.endswith("." + m) for n in targets)})
    config = {"r": rank, "lora_alpha": alpha or rank, "target_modules": modules}
    metadata = {"lora_adapter_metadata": json.dumps({"unet." + k: v for k, v in config.items()})}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return sum(t.numel() * t.element_size() for t in tensors.values())

"""Writing a LoRAAdapter back to safetensors, in the diffusers/PEFT or the kohya layout.

Either file loads back (here, in diffusers, in kohya-compatible UIs) to the same deltas. The
scale is what is preserved: alpha is written as scale·rank with rsLoRA off, which gives the
same scale under either loader.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Literal

import safetensors.torch
import torch

from sdserve.adapters.formats.kohya import flatten
from sdserve.adapters.formats.peft import METADATA_KEY
from sdserve.adapters.lora import LoRAAdapter, LoRAModule
from sdserve.adapters.targets import portable_path

SLIDER_METADATA_KEY = "sdserve_slider"


def _factors(module: LoRAModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's factors in file shape, copied out of the shared buffer (safetensors refuses
    tensors that share storage)."""
    if module.kind == "conv":
        down = module.a.reshape(module.rank, module.in_features, *module.kernel_size)  # [r, in, kh, kw]
        up = module.b.reshape(module.out_features, module.rank, 1, 1)  # [out, r, 1, 1]
    else:
        down, up = module.a, module.b  # [r, in], [out, r]
    return down.detach().to("cpu").clone(), up.detach().to("cpu").clone()


def _peft_config(modules: list[tuple[str, LoRAModule]]) -> dict[str, object]:
    """A LoraConfig dict (as diffusers writes it) that gives every module its rank and scale.

    Paths are written without the text encoders' "text_model." level and patterns unanchored:
    PEFT matches both as dotted suffixes, so the config fits a CLIP model with or without that
    level (diffusers drops it from the weights' keys, but not from the config).
    """
    ranks = Counter(module.rank for _, module in modules)
    alphas = Counter(module.scale * module.rank for _, module in modules)
    r, lora_alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    rank_pattern, alpha_pattern = {}, {}
    for path, module in modules:
        pattern = re.escape(path)
        if module.rank != r:
            rank_pattern[pattern] = module.rank
        if module.scale * module.rank != lora_alpha:
            alpha_pattern[pattern] = module.scale * module.rank
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(path for path, _ in modules),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
    }


def lora_state_dict(
    adapter: LoRAAdapter, layout: Literal["peft", "kohya"] = "peft"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata that `save_lora` writes."""
    if adapter.dora_targets:
        raise ValueError(f"adapter {adapter.name!r} is DoRA: save_lora writes plain LoRA factors only")
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    if adapter.is_slider:
        metadata[SLIDER_METADATA_KEY] = "true"
    if layout == "peft":
        per_component: dict[str, list[tuple[str, LoRAModule]]] = {}
        for target, module in adapter.modules.items():
            down, up = _factors(module)
            component, _, path = target.partition(".")
            stem = f"{component}.{portable_path(component, path)}"
            tensors[f"{stem}.lora_A.weight"] = down
            tensors[f"{stem}.lora_B.weight"] = up
            per_component.setdefault(component, []).append((path.removeprefix("text_model."), module))
        packed = {
            f"{component}.{key}": value
            for component, modules in per_component.items()
            for key, value in _peft_config(modules).items()
        }
        metadata[METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    elif layout == "kohya":
        # SDXL files name the first text encoder lora_te1_; SD 1.x/2.x files lora_te_.
        te_prefix = "lora_te1_" if "text_encoder_2" in adapter.components else "lora_te_"
        prefixes = {"unet": "lora_unet_", "text_encoder": te_prefix, "text_encoder_2": "lora_te2_"}
        for target, module in adapter.modules.items():
            component, _, path = target.partition(".")
            stem = prefixes[component] + flatten(portable_path(component, path))
            down, up = _factors(module)
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            tensors[f"{stem}.alpha"] = torch.tensor(module.scale * module.rank, dtype=torch.float32)
    else:
        raise ValueError(f"layout must be 'peft' or 'kohya', got {layout!r}")
    return tensors, metadata


def save_lora(
    adapter: LoRAAdapter, path: str | os.PathLike[str], layout: Literal["peft", "kohya"] = "peft"
) -> None:
    """Write `adapter` as a safetensors file in the given layout."""
    tensors, metadata = lora_state_dict(adapter, layout)
    safetensors.torch.save_file(tensors, os.fspath(path), metadata={"format": "pt", **metadata})

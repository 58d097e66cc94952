"""Build tiny SD-family components and write LoRA files for them in every layout sdserve reads.

The LoRAs are made by PEFT itself (LoraConfig + inject_adapter_in_model) with random non-zero
A and B, so each comes with an independent oracle: PEFT's own `get_delta_weight` per module.
The files written here load in diffusers (`load_lora_weights`), so the engine's parity tests
can load the same file into diffusers and into sdserve.

    comps = tiny_sd15_components()
    lora = make_peft_lora(comps, {"unet": LoraConfig(r=4, lora_alpha=6, target_modules=[...])})
    write_lora(lora, tmp_path / "a.safetensors", layout="peft")     # or "kohya", "kohya_sgm",
    lora.deltas["unet.down_blocks.0.resnets.0.conv1"]               #    "peft_no_metadata", "legacy"
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdserve.adapters.formats.sgm import sgm_aliases
from sdserve.adapters.targets import portable_path

# Every nn.Linear/nn.Conv2d kind that SD LoRAs commonly adapt, as PEFT target-module suffixes.
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_CONV = ["conv1", "conv2", "conv_shortcut", "conv", "time_emb_proj"]  # "conv": up/down samplers
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def tiny_unet(**overrides: object) -> UNet2DConditionModel:
    """An SD 1.x-shaped UNet small enough for CPU tests."""
    config: dict[str, object] = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        sample_size=16,
        norm_num_groups=16,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's block layout (3 levels, 2 layers each, no attention at the first level, linear
    projections, text_time added conditioning) at tiny widths, so sgm block indices are real."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32) hidden states
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,  # 6 size/crop ids + pooled text_encoder_2
        sample_size=16,
        norm_num_groups=16,
    ).eval()


def tiny_clip(with_projection: bool = False) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def tiny_sd15_components() -> dict[str, torch.nn.Module]:
    return {"unet": tiny_unet(), "text_encoder": tiny_clip()}


def tiny_sdxl_components() -> dict[str, torch.nn.Module]:
    return {"unet": tiny_sdxl_unet(), "text_encoder": tiny_clip(), "text_encoder_2": tiny_clip(True)}


@dataclass
class FactoryLoRA:
    """A PEFT-made LoRA: its state dict (diffusers keys), configs and per-module oracle deltas."""

    state_dict: dict[str, torch.Tensor]  # "unet.<path>.lora_A.weight" -> [r, in] / [r, in, kh, kw]
    configs: dict[str, LoraConfig]
    deltas: dict[str, torch.Tensor]  # "<component>.<path>" -> scale·B@A in the base weight's shape
    scalings: dict[str, float]
    ranks: dict[str, int]
    unet_paths: list[str] = field(default_factory=list)  # every module path of the UNet


def make_peft_lora(
    components: Mapping[str, torch.nn.Module], configs: Mapping[str, LoraConfig], seed: int = 0
) -> FactoryLoRA:
    """Inject a PEFT LoRA into a copy of each configured component and randomise A and B."""
    generator = torch.Generator().manual_seed(seed)
    result = FactoryLoRA({}, dict(configs), {}, {}, {})
    result.unet_paths = [path for path, _ in components["unet"].named_modules()] if "unet" in components else []
    for component, config in configs.items():
        model = inject_adapter_in_model(copy.deepcopy(config), copy.deepcopy(components[component]))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    # Non-zero B (PEFT initialises it to 0) so every delta is visible.
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        for key, tensor in get_peft_model_state_dict(model).items():
            result.state_dict[f"{component}.{key}"] = tensor.detach().clone()
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                target = f"{component}.{path}"
                result.deltas[target] = module.get_delta_weight("default").detach().clone()
                result.scalings[target] = float(module.scaling["default"])
                result.ranks[target] = int(module.r["default"])
    return result


def _config_dict(config: LoraConfig) -> dict[str, object]:
    raw = config.to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in raw.items()}


def _file_keys(state_dict: Mapping[str, torch.Tensor], text_model_prefix: bool) -> dict[str, torch.Tensor]:
    """Keys as files name text-encoder modules: with "text_model." (every file written before
    transformers 5 flattened CLIPTextModel) or as the live model spells them."""
    if not text_model_prefix:
        return dict(state_dict)
    renamed = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        renamed[f"{component}.{portable_path(component, rest)}"] = tensor
    return renamed


def peft_file_contents(
    lora: FactoryLoRA, with_metadata: bool = True, text_model_prefix: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header as diffusers' save_lora_weights writes them."""
    metadata: dict[str, str] = {"format": "pt"}
    if with_metadata:
        packed = {
            f"{component}.{key}": value
            for component, config in lora.configs.items()
            for key, value in _config_dict(config).items()
        }
        metadata["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
    return _file_keys(lora.state_dict, text_model_prefix), metadata


def kohya_file_contents(
    lora: FactoryLoRA, sgm: bool = False, te_prefix: str = "lora_te_"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors as kohya sd-scripts writes them: flattened names, lora_down/lora_up, .alpha.

    `sgm` names UNet modules the way SDXL's original model does (input_blocks/middle_block/...).
    """
    to_sgm = {path: sgm_path for sgm_path, path in sgm_aliases(lora.unet_paths).items()} if sgm else {}
    prefixes = {"unet": "lora_unet_", "text_encoder": te_prefix, "text_encoder_2": "lora_te2_"}
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in lora.state_dict.items():
        component, _, rest = key.partition(".")
        path, _, role = rest.rpartition(".lora_")  # role: "A.weight" / "B.weight"
        if sgm and component == "unet":
            path = to_sgm[path]
        stem = prefixes[component] + portable_path(component, path).replace(".", "_")
        tensors[f"{stem}.lora_down.weight" if role == "A.weight" else f"{stem}.lora_up.weight"] = tensor
        if role == "A.weight":
            target = f"{component}.{rest.rpartition('.lora_')[0]}"
            # kohya has no rsLoRA: its alpha reproduces PEFT's scale as alpha / rank.
            tensors[f"{stem}.alpha"] = torch.tensor(lora.scalings[target] * lora.ranks[target])
    return tensors, {"format": "pt"}


def legacy_file_contents(lora: FactoryLoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The pre-PEFT diffusers layout (attention processors; no alphas, so scale 1).

    Only UNet attention projections and LoRACompatible convs have a legacy spelling here; the
    text encoder uses "...self_attn.to_q_lora.down.weight".
    """
    unet_names = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    clip_names = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in _file_keys(lora.state_dict, True).items():
        component, _, rest = key.partition(".")
        path, _, role = rest.rpartition(".lora_")
        suffix = "down.weight" if role == "A.weight" else "up.weight"
        names = clip_names if component.startswith("text_encoder") else unet_names
        head, _, last = path.rpartition(".")
        if path.endswith("to_out.0"):
            head, last = path[: -len(".to_out.0")], "to_out.0"
        if last in names:
            processor = ".processor" if component == "unet" else ""
            tensors[f"{component}.{head}{processor}.{names[last]}.{suffix}"] = tensor
        elif component.startswith("text_encoder"):
            tensors[f"{component}.{path}.lora_linear_layer.{suffix}"] = tensor  # CLIP MLP
        else:
            tensors[f"{component}.{path}.lora.{suffix}"] = tensor  # LoRACompatible layers
    return tensors, {}


LAYOUTS = ("peft", "peft_no_metadata", "peft_flat_clip", "kohya", "kohya_sgm", "legacy")
# Layouts that carry no alphas: diffusers and sdserve load them with scale 1 (alpha = rank).
UNSCALED_LAYOUTS = ("peft_no_metadata", "legacy")


def write_lora(lora: FactoryLoRA, path: str | os.PathLike[str], layout: str = "peft",
               extra_metadata: Mapping[str, str] | None = None) -> None:
    """Write `lora` as a safetensors file in one of LAYOUTS."""
    if layout == "peft":
        tensors, metadata = peft_file_contents(lora)
    elif layout == "peft_no_metadata":
        tensors, metadata = peft_file_contents(lora, with_metadata=False)
    elif layout == "peft_flat_clip":  # as diffusers writes it with transformers >= 5
        tensors, metadata = peft_file_contents(lora, text_model_prefix=False)
    elif layout in ("kohya", "kohya_sgm"):
        te_prefix = "lora_te1_" if "text_encoder_2" in lora.configs else "lora_te_"
        tensors, metadata = kohya_file_contents(lora, sgm=layout == "kohya_sgm", te_prefix=te_prefix)
    elif layout == "legacy":
        tensors, metadata = legacy_file_contents(lora)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    metadata = {**metadata, **(extra_metadata or {})}
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=metadata or None
    )

"""Test helper: a diffusers-format model written back as one file in the original (LDM) layout.

The reverse of diffusers' single-file conversion, written independently of it (diffusers ships
only the forward direction), so a round trip through `sdserve.models.single_file` checks both:
UNet under `model.diffusion_model.`, VAE under `first_stage_model.`, text encoders under
`cond_stage_model.transformer.` (SD 1.x), `cond_stage_model.model.` (SD 2.x, OpenCLIP names) or
`conditioner.embedders.{0,1}.` (SDXL).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _weights(component_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(component_dir.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def _text_weights(component_dir: Path) -> dict[str, torch.Tensor]:
    """HF CLIP weights under `text_model.` as the original files name them (transformers >= 5.6
    saves a CLIPTextModel without that level)."""
    out = {}
    for key, value in _weights(component_dir).items():
        if key.endswith("position_ids"):
            continue
        out[key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"] = value
    return out


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    per_level = config["layers_per_block"] + 1  # resnets (+ attentions) and a down/upsampler
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        top = next((k for k in _UNET_TOP if key.startswith(k + ".")), None)
        if top is not None:
            out[_UNET_TOP[top] + key[len(top):]] = value
            continue
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = 1 + level * per_level + j
            name = f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
            out[f"input_blocks.{name}"] = value
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            out[f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"] = value
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = level * per_level + j
            name = f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
            out[f"output_blocks.{name}"] = value
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            level = int(m[1])
            has_attention = any(k.startswith(f"up_blocks.{level}.attentions.") for k in state)
            out[f"output_blocks.{level * per_level + per_level - 1}.{2 if has_attention else 1}.conv.{m[2]}"] = value
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            out[f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"] = value
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            out[f"middle_block.1.{m[1]}"] = value
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    levels = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if value.dim() == 2:  # the original attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out[prefix + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str, hidden: int) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> OpenCLIP names (q, k, v fused into in_proj; text_projection transposed)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = value
            continue
        new = {
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias",
        }.get(key)
        if key == "text_projection.weight":
            new, value = "text_projection", value.T.contiguous()
        if new is None:
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
            assert m, key
            rest = (
                m[2].replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc")
                .replace("mlp.fc2", "mlp.c_proj").replace("self_attn.out_proj", "attn.out_proj")
            )
            new = f"transformer.resblocks.{m[1]}.{rest}"
        out[prefix + new] = value
    for name, parts in fused.items():
        out[prefix + name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if prefix + "text_projection" not in out:
        # SD 2.x's text encoder drops OpenCLIP's projection; the original file still holds one.
        out[prefix + "text_projection"] = torch.eye(hidden)
    return out


def write_original_checkpoint(model_dir: Path, out_file: Path) -> None:
    """Write the diffusers-format SD model at `model_dir` as one original-layout safetensors file."""
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
    text_config = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    state = unet_to_ldm(_weights(model_dir / "unet"), unet_config)
    state.update(vae_to_ldm(_weights(model_dir / "vae"), vae_config))
    text = _text_weights(model_dir / "text_encoder")
    if (model_dir / "text_encoder_2").is_dir():
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in text.items()})
        text_2_config = json.loads((model_dir / "text_encoder_2" / "config.json").read_text())
        state.update(open_clip_to_ldm(_text_weights(model_dir / "text_encoder_2"), "conditioner.embedders.1.model.",
                                      text_2_config["hidden_size"]))
    elif text_config.get("hidden_act") == "gelu":
        state.update(open_clip_to_ldm(text, "cond_stage_model.model.", text_config["hidden_size"]))
    else:
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    # What real files carry besides the modules (LDM's schedule buffers, EMA counters, CLIP's
    # position ids): the loader must ignore them.
    text_prefix = "conditioner.embedders.0.transformer." if (model_dir / "text_encoder_2").is_dir() else (
        "cond_stage_model.transformer." if text_config.get("hidden_act") != "gelu" else None)
    if text_prefix:
        state[text_prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance"):
        state[name] = torch.linspace(0.0, 1.0, 1000)
    state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file))


def write_sparse_checkpoint(config_dir: Path, out_file: Path) -> None:
    """A float16 original-layout file with the full-size shapes `config_dir`'s configs give and no
    data (a sparse file of zeros): enough for everything that reads only the header."""
    import struct

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text(subfolder: str) -> dict[str, torch.Tensor]:
        config = CLIPTextConfig.from_pretrained(config_dir / subfolder)
        cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in (config.architectures or []) else CLIPTextModel
        with init_empty_weights():
            state = cls(config).state_dict()
        return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                for k, v in state.items() if not k.endswith("position_ids")}

    unet_config = UNet2DConditionModel.load_config(config_dir / "unet")
    vae_config = AutoencoderKL.load_config(config_dir / "vae")
    with init_empty_weights():
        state = unet_to_ldm(UNet2DConditionModel.from_config(unet_config).state_dict(), unet_config)
        state.update(vae_to_ldm(AutoencoderKL.from_config(vae_config).state_dict(), vae_config))
    first = text("text_encoder")
    hidden = int(first["text_model.embeddings.token_embedding.weight"].shape[1])
    if (config_dir / "text_encoder_2").is_dir():
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in first.items()})
        second = text("text_encoder_2")
        state.update(open_clip_to_ldm(second, "conditioner.embedders.1.model.",
                                      int(second["text_model.embeddings.token_embedding.weight"].shape[1])))
    elif json.loads((config_dir / "text_encoder" / "config.json").read_text())["hidden_act"] == "gelu":
        state.update(open_clip_to_ldm(first, "cond_stage_model.model.", hidden))
    else:
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in first.items()})
    header, offset = {}, 0
    for key in sorted(state):
        shape = list(state[key].shape)
        size = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with out_file.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)  # sparse: no data blocks are written

"""LoRA training: low-rank factors on the UNet's attention (and optionally its feed-forward and
transformer projections, and the CLIP text encoders' attention), trained by the shared loop.

Each adapted module becomes `LoRALayer(base)`, computing base(x) + (alpha/r)·B·A·x with
A `[r, in·kh·kw]` (kaiming-uniform, as nn.Linear and PEFT initialise it, or normal(0, 1/r))
and B `[out, r]` zero, so at step 0 the model is exactly the base model. The factors are
held in sdserve's own orientation (PEFT's), so the output is built as a `LoRAAdapter` (through
`adapters.validate_lora`, the same checks an uploaded file passes) and written by
`adapters.save.lora_state_dict` in either layout: diffusers/PEFT ("diffusers": what
`pipe.load_lora_weights` and sdserve load) or kohya sd-scripts ("kohya": lora_unet_..., .alpha).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sdserve.adapters import (
    DEFAULT_MAX_RANK,
    MAX_SCALE,
    LoRAAdapter,
    TargetSpec,
    spec_of,
    targets_of,
    validate_lora,
)
from sdserve.adapters.formats.common import RawPair
from sdserve.adapters.lora import ParsedLoRA
from sdserve.adapters.save import lora_state_dict
from sdserve.errors import InvalidArgument
from sdserve.trainers.components import Components
from sdserve.trainers.loop import restore_state, seeded_generator
from sdserve.trainers.output import safetensors_bytes

# Module-path endings of each target group. "attn" is what diffusers' and kohya's LoRA scripts
# train by default; "ff" and "proj" add the transformer blocks' MLP and their in/out projections
# (1x1 convs in SD 1.x, linears in SD 2.x and SDXL).
UNET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": (".to_q", ".to_k", ".to_v", ".to_out.0"),
    "ff": (".ff.net.0.proj", ".ff.net.2"),
    "proj": (".proj_in", ".proj_out"),
    # The ResNet blocks' 3x3 convs: kohya's LoCon ("conv_dim"), which sdserve serves per row and
    # PEFT loads as Conv2d LoRA; where shape, not style, is what the adapter must teach.
    "conv": (".conv1", ".conv2"),
}
TEXT_ENCODER_ENDINGS = (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj")
_INIT_STREAM = 21  # seeded_generator stream of the initial A factors
_KOHYA_BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass(frozen=True)
class LoRAConfig:
    """The LoRA's shape; the `sdserve train lora` flags mirror these fields."""

    rank: int = 4
    """Rank r of every factor pair."""
    alpha: float | None = None
    """Scale numerator: the delta is (alpha / rank)·B·A (None: alpha = rank, scale 1)."""
    unet_targets: tuple[str, ...] = ("attn",)
    """Groups of UNet modules to adapt: attn, ff, proj, conv (see UNET_GROUPS)."""
    text_encoder: bool = False
    """Also adapt the text encoders' attention (q/k/v/out_proj)."""
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """How A starts: kaiming-uniform (nn.Linear's, PEFT's default) or normal(0, 1/rank)."""
    format: Literal["diffusers", "kohya"] = "diffusers"
    """Key layout of the written file."""

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def check_config(config: LoRAConfig) -> None:
    """One-line errors naming the flag, before any model is loaded."""
    if not 1 <= config.rank <= DEFAULT_MAX_RANK:
        raise InvalidArgument(f"must be between 1 and {DEFAULT_MAX_RANK}, the largest rank sdserve serves "
                              f"(got {config.rank})", field="--rank")
    if config.alpha is not None and not (math.isfinite(config.alpha) and abs(config.scale) <= MAX_SCALE):
        raise InvalidArgument(f"alpha / rank must be finite and at most {MAX_SCALE:g} in magnitude "
                              f"(got {config.alpha})", field="--alpha")
    unknown = sorted(set(config.unet_targets) - set(UNET_GROUPS))
    if unknown or not config.unet_targets:
        raise InvalidArgument(f"choose from {', '.join(UNET_GROUPS)} (got {', '.join(config.unet_targets)})",
                              field="--targets")
    if config.format not in ("diffusers", "kohya"):
        raise InvalidArgument(f"must be diffusers or kohya (got {config.format})", field="--format")


class LoRALayer(nn.Module):
    """A frozen nn.Linear or nn.Conv2d plus a trainable low-rank delta:
    y = base(x) + scale · B @ (A @ x), A `[r, in·kh·kw]`, B `[out, r]` (a conv's A is applied as
    a conv with the base's kernel, stride and padding, B as a 1x1 conv)."""

    def __init__(self, base: nn.Module, spec: TargetSpec, rank: int, scale: float,
                 init: str, generator: torch.Generator) -> None:
        super().__init__()
        self.base, self.spec, self.rank, self.scale = base, spec, rank, scale
        self.down = nn.Parameter(torch.empty(rank, spec.a_columns))  # [r, in·kh·kw]
        self.up = nn.Parameter(torch.zeros(spec.out_features, rank))  # [out, r]
        with torch.no_grad():
            if init == "gaussian":
                self.down.normal_(0.0, 1.0 / rank, generator=generator)
            else:  # fan_in is in·kh·kw either way, as for the [r, in, kh, kw] conv weight
                nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.spec.kind == "linear":  # x [..., in] -> [..., out]
            return y + self.scale * F.linear(F.linear(x, self.down), self.up)
        spec = self.spec  # x [B, in, H, W] -> [B, out, H', W']
        down = self.down.view(self.rank, spec.in_features, *spec.kernel_size)  # [r, in, kh, kw]
        hidden = F.conv2d(x, down, None, spec.stride, spec.padding, spec.dilation)  # [B, r, H', W']
        return y + self.scale * F.conv2d(hidden, self.up[:, :, None, None])


def _file_factors(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) as files store them: a conv's down `[r, in, kh, kw]` and up `[out, r, 1, 1]`
    (as kohya's LoCon and PEFT write them), a linear's `[r, in]` and `[out, r]`."""
    down, up = layer.down.detach().clone(), layer.up.detach().clone()
    if layer.spec.kind == "linear":
        return down, up
    return down.view(layer.rank, layer.spec.in_features, *layer.spec.kernel_size), up[:, :, None, None]


def select_targets(targets: Mapping[str, TargetSpec], config: LoRAConfig) -> list[str]:
    """The target names the config adapts, sorted."""
    endings = tuple(e for group in config.unet_targets for e in UNET_GROUPS[group])
    chosen = [t for t in targets if t.startswith("unet.") and t.endswith(endings)]
    if config.text_encoder:
        chosen += [t for t in targets if t.startswith("text_encoder") and t.endswith(TEXT_ENCODER_ENDINGS)]
    return sorted(chosen)


class LoRAMethod:
    """The LoRA method for `loop.train`: wraps the chosen modules of `components` in place
    (`remove()` puts the originals back)."""

    kind = "lora"

    def __init__(self, components: Components, config: LoRAConfig, seed: int = 0) -> None:
        check_config(config)
        self.components, self.config = components, config
        modules = components.adapter_components()
        self.targets = targets_of(modules)  # of the unwrapped model: what the output must fit
        chosen = select_targets(self.targets, config)
        if not chosen:
            raise InvalidArgument("the model has no module of these groups", field="--targets")
        generator = seeded_generator(seed, _INIT_STREAM)
        self.layers: dict[str, LoRALayer] = {}
        for target in chosen:
            component, _, path = target.partition(".")
            parent_path, _, child = path.rpartition(".")
            parent = modules[component].get_submodule(parent_path) if parent_path else modules[component]
            base = getattr(parent, child)
            spec = spec_of(base)
            assert spec is not None, target  # targets_of listed it
            layer = LoRALayer(base, spec, config.rank, config.scale, config.init, generator)
            setattr(parent, child, layer)
            self.layers[target] = layer

    def remove(self) -> None:
        """Put the base modules back (the components are the base model again)."""
        modules = self.components.adapter_components()
        for target, layer in self.layers.items():
            component, _, path = target.partition(".")
            parent_path, _, child = path.rpartition(".")
            parent = modules[component].get_submodule(parent_path) if parent_path else modules[component]
            setattr(parent, child, layer.base)

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.down, layer.up)]

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        side = noisy.shape[-1] * self.components.vae_scale_factor
        conditioning = self.components.encode_text(captions, resolution=side)
        return self.components.predict(noisy, timesteps, conditioning)  # [B, C, h, w]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for target, layer in self.layers.items():
            state[f"{target}.down"] = layer.down.detach()
            state[f"{target}.up"] = layer.up.detach()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        restore_state(self.state_dict(), state, "LoRA modules")

    def metadata(self) -> dict[str, str]:
        alpha = self.config.rank if self.config.alpha is None else self.config.alpha
        return {
            "sdserve_rank": str(self.config.rank),
            "sdserve_alpha": f"{alpha:g}",
            "sdserve_targets": ",".join(self.config.unet_targets) + (",text_encoder" if self.config.text_encoder else ""),
        }

    def adapter(self, name: str = "trained") -> LoRAAdapter:
        """The current factors as a validated LoRAAdapter (what the server would load)."""
        alpha = float(self.config.rank if self.config.alpha is None else self.config.alpha)
        pairs = [
            RawPair(target=target, down=down, up=up, alpha=alpha, use_rslora=False, key=target)
            for target, (down, up) in ((t, _file_factors(layer)) for t, layer in self.layers.items())
        ]
        parsed = ParsedLoRA(layout="peft", pairs=pairs, is_slider=False)
        return validate_lora(parsed, name, self.targets, max_rank=DEFAULT_MAX_RANK)

    def write(self, out: Path, metadata: dict[str, str]) -> None:
        layout = "kohya" if self.config.format == "kohya" else "peft"
        tensors, header = lora_state_dict(self.adapter(), layout)
        alpha = self.config.rank if self.config.alpha is None else self.config.alpha
        kohya = {  # what kohya-compatible UIs read to describe a LoRA
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.config.rank),
            "ss_network_alpha": f"{alpha:g}",
            "ss_base_model_version": _KOHYA_BASE_VERSIONS.get(self.components.family, self.components.family),
            "ss_v2": str(self.components.family == "sd2"),
            "ss_steps": metadata.get("sdserve_steps", ""),
            "ss_seed": metadata.get("sdserve_seed", ""),
            "ss_resolution": metadata.get("sdserve_resolution", ""),
        }
        header = {**kohya, **metadata, "sdserve_format": self.config.format, **header}
        out.write_bytes(safetensors_bytes(tensors, header))

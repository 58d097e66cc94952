"""The modules of a base model that a LoRA may target, described without holding the model.

Validation runs against this description rather than against live modules, so the server can
check an uploaded adapter without touching (or locking) the weights that are serving requests.
A target is named "<component>.<module path>", e.g. "unet.down_blocks.0.attentions.0.proj_in"
or "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": the diffusers/PEFT key of the
module minus the LoRA suffix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

# The component names of the SD-family pipelines, as diffusers prefixes their LoRA keys.
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class TargetSpec:
    """Shape facts of one nn.Linear or nn.Conv2d that a LoRA can adapt."""

    kind: Literal["linear", "conv"]
    in_features: int  # in_channels for a conv
    out_features: int  # out_channels for a conv
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def a_columns(self) -> int:
        """Width of the flattened down matrix A: in for a linear, in·kh·kw for a conv."""
        return self.in_features * self.kernel_size[0] * self.kernel_size[1]


def _pair(value: int | tuple[int, ...] | str) -> tuple[int, int]:
    if isinstance(value, str):
        # padding="same"/"valid" is legal in nn.Conv2d; SD models do not use it, and a LoRA's
        # down conv would need the same string, so it is described as unknown padding (-1, -1).
        return (-1, -1)
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def spec_of(module: torch.nn.Module) -> TargetSpec | None:
    """The TargetSpec of a module, or None when a LoRA cannot target it.

    isinstance covers diffusers' LoRACompatibleLinear/LoRACompatibleConv, which subclass the
    torch layers. Grouped convs are skipped: a LoRA pair has no grouped form.
    """
    if isinstance(module, torch.nn.Linear):
        return TargetSpec("linear", module.in_features, module.out_features)
    if isinstance(module, torch.nn.Conv2d) and module.groups == 1:
        return TargetSpec(
            "conv",
            module.in_channels,
            module.out_channels,
            kernel_size=_pair(module.kernel_size),
            stride=_pair(module.stride),
            padding=_pair(module.padding),
            dilation=_pair(module.dilation),
        )
    return None


# transformers 5 flattened CLIPTextModel (no "text_model." level) while CLIPTextModelWithProjection
# keeps one; LoRA files from either era name text-encoder modules with or without it.
_CLIP_WRAPPER = "text_model."
_CLIP_INNER = ("embeddings.", "encoder.", "final_layer_norm")


def resolve_target(target: str, targets: Mapping[str, TargetSpec]) -> str | None:
    """The target name under which the base model has `target`, allowing for the text encoders'
    optional "text_model." level; None when the model has no such module."""
    if target in targets:
        return target
    component, _, path = target.partition(".")
    if not component.startswith("text_encoder"):
        return None
    if path.startswith(_CLIP_WRAPPER):
        alias = f"{component}.{path.removeprefix(_CLIP_WRAPPER)}"
    else:
        alias = f"{component}.{_CLIP_WRAPPER}{path}"
    return alias if alias in targets else None


def portable_path(component: str, path: str) -> str:
    """The module path as files written before transformers 5 spell it (with "text_model."),
    which every loader accepts: diffusers drops the level where the model lacks it."""
    if component.startswith("text_encoder") and path.startswith(_CLIP_INNER):
        return _CLIP_WRAPPER + path
    return path


def targets_of(components: Mapping[str, torch.nn.Module]) -> dict[str, TargetSpec]:
    """Every LoRA-targetable module of the given components, keyed "<component>.<module path>".

    `components` maps a component name ("unet", "text_encoder", "text_encoder_2") to its model.
    """
    targets: dict[str, TargetSpec] = {}
    for component, model in components.items():
        for path, module in model.named_modules():
            spec = spec_of(module)
            if spec is not None and path:
                targets[f"{component}.{path}"] = spec
    return targets

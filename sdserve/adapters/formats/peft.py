"""The diffusers/PEFT layout: "unet.<module path>.lora_A.weight" / ".lora_B.weight".

diffusers' `save_lora_weights` writes one key per factor, prefixed by component, and (since
0.35) the PEFT LoraConfig of each component into the safetensors header under
"lora_adapter_metadata" as JSON, its keys prefixed the same way ("unet.r", "unet.lora_alpha",
"text_encoder.alpha_pattern", ...); a model-level `save_lora_adapter` writes one unprefixed config.
Without a config, diffusers loads with alpha = rank (scale 1), and so do we.

The older attention-processor layout ("...attn1.processor.to_q_lora.down.weight",
"...conv1.lora.down.weight", "...mlp.fc1.lora_linear_layer.down.weight") maps onto the same
modules; it carried no alphas.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sdserve.adapters.formats.common import RawPair, short
from sdserve.adapters.targets import COMPONENTS, TargetSpec, resolve_target
from sdserve.errors import AdapterError

METADATA_KEY = "lora_adapter_metadata"
# Patterns come from an untrusted header and are matched as regular expressions (PEFT's rule);
# bounding their size and number bounds the matching work.
_MAX_PATTERN_CHARS = 1000
_MAX_PATTERNS = 10_000

# Attention-processor LoRA names -> the projection module they adapt, per component family.
_UNET_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_CLIP_PROCESSOR = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


@dataclass(frozen=True)
class _Config:
    """The parts of a PEFT LoraConfig that decide a module's rank and scale."""

    r: int | None
    lora_alpha: float | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool

    def _match(self, patterns: Mapping[str, Any], module_path: str) -> Any:
        # PEFT's get_pattern_key: the first pattern that matches a dotted suffix of the path.
        for pattern in patterns:
            if re.match(rf"(.*\.)?({pattern})$", module_path):
                return patterns[pattern]
        return None

    def alpha_for(self, module_path: str) -> float | None:
        alpha = self._match(self.alpha_pattern, module_path)
        return float(alpha) if alpha is not None else self.lora_alpha

    def rank_for(self, module_path: str) -> int | None:
        rank = self._match(self.rank_pattern, module_path)
        return int(rank) if rank is not None else self.r


def _parse_config(name: str, raw: Mapping[str, Any]) -> _Config:
    try:
        rank_pattern = dict(raw.get("rank_pattern") or {})
        alpha_pattern = dict(raw.get("alpha_pattern") or {})
        patterns = list(rank_pattern) + list(alpha_pattern)
        if len(patterns) > _MAX_PATTERNS or any(len(p) > _MAX_PATTERN_CHARS for p in patterns):
            raise ValueError("pattern too large")
        for pattern in patterns:
            re.compile(pattern)
        r = raw.get("r")
        alpha = raw.get("lora_alpha")
        return _Config(
            r=int(r) if r is not None else None,
            lora_alpha=float(alpha) if alpha is not None else None,
            rank_pattern={str(k): int(v) for k, v in rank_pattern.items()},
            alpha_pattern={str(k): float(v) for k, v in alpha_pattern.items()},
            use_rslora=bool(raw.get("use_rslora", False)),
        )
    except (TypeError, ValueError, re.error):
        raise AdapterError(name, f"invalid {METADATA_KEY} in the file header") from None


def parse_configs(name: str, metadata: Mapping[str, str]) -> dict[str, _Config] | None:
    """Per-component LoRA configs from the header; key "" holds an unprefixed (model-level) one."""
    raw_text = metadata.get(METADATA_KEY)
    if not raw_text:
        return None
    try:
        raw = json.loads(raw_text)
    except ValueError:
        raise AdapterError(name, f"invalid {METADATA_KEY} in the file header") from None
    if not isinstance(raw, dict):
        raise AdapterError(name, f"invalid {METADATA_KEY} in the file header")
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        component, dot, field = str(key).partition(".")
        if dot and component in COMPONENTS:
            grouped.setdefault(component, {})[field] = value
        else:
            grouped.setdefault("", {})[str(key)] = value
    return {component: _parse_config(name, fields) for component, fields in grouped.items()}


def _split_component(path: str) -> tuple[str, str]:
    component, _, rest = path.partition(".")
    if component in COMPONENTS and rest:
        return component, rest
    # Files from before diffusers prefixed keys hold UNet weights only.
    return "unet", path


def _legacy_module(component: str, stem: str) -> str | None:
    """Module path of a legacy key stem (the key without ".down.weight"/".up.weight")."""
    for marker in (".lora_linear_layer", ".lora"):
        if stem.endswith(marker):
            return stem[: -len(marker)]
    head, _, last = stem.rpartition(".")
    processor = _CLIP_PROCESSOR if component.startswith("text_encoder") else _UNET_PROCESSOR
    if last in processor:
        head = head.removesuffix(".processor")
        return f"{head}.{processor[last]}"
    return None


def _role_and_module(key: str) -> tuple[str, str, str] | None:
    """(role "down"/"up", component, module path) of a LoRA key, or None for any other key."""
    path = key.removeprefix("base_model.model.")
    for suffix, role in ((".lora_A.weight", "down"), (".lora_B.weight", "up")):
        if path.endswith(suffix):
            component, module = _split_component(path[: -len(suffix)])
            return role, component, module
    for suffix, role in ((".down.weight", "down"), (".up.weight", "up")):
        if path.endswith(suffix):
            component, stem = _split_component(path[: -len(suffix)])
            module = _legacy_module(component, stem)
            return (role, component, module) if module else None
    return None


def parse_peft(
    name: str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    targets: Mapping[str, TargetSpec],
) -> list[RawPair]:
    """Pair up the factors of a diffusers/PEFT-layout file and attach each module's alpha.

    Targets are resolved to the base model's spelling where they differ only by the text
    encoders' "text_model." level; unresolved ones are kept for validation to report.
    """
    configs = parse_configs(name, metadata)
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        found = _role_and_module(key)
        if found is None:
            raise AdapterError(name, f"unexpected key {short(key)!r} in a LoRA file")
        role, component, module = found
        target = f"{component}.{module}"
        slot = factors.setdefault(resolve_target(target, targets) or target, {})
        if role in slot:
            raise AdapterError(name, f"two LoRA weights for the same module ({short(key)!r})")
        slot[role] = (key, tensor)

    pairs: list[RawPair] = []
    for target, slot in factors.items():
        if "down" not in slot or "up" not in slot:
            present = next(iter(slot.values()))[0]
            raise AdapterError(name, f"LoRA key {short(present)!r} has no matching up/down partner")
        down_key, down = slot["down"]
        _, up = slot["up"]
        # Config patterns (often "^"-anchored) were written against the file's own spelling
        # of the module path, so they are matched against that, not the resolved target.
        _, component, module = _role_and_module(down_key) or ("", "", "")
        config = None if configs is None else configs.get(component, configs.get(""))
        pairs.append(
            RawPair(
                target=target,
                down=down,
                up=up,
                alpha=config.alpha_for(module) if config else None,
                use_rslora=config.use_rslora if config else False,
                key=down_key,
                config_rank=config.rank_for(module) if config else None,
            )
        )
    return pairs

"""The diffusers/PEFT layout: "unet.<module path>.lora_A.weight" / ".lora_B.weight".

diffusers' `save_lora_weights` writes one key per factor, prefixed by component, and (since
0.35) the PEFT LoraConfig of each component into the safetensors header under
"lora_adapter_metadata" as JSON, its keys prefixed the same way ("unet.r", "unet.lora_alpha",
"text_encoder.alpha_pattern", ...); a model-level `save_lora_adapter` writes one unprefixed config.
Without a config, diffusers loads with alpha = rank (scale 1), and so do we.

The older attention-processor layout ("...attn1.processor.to_q_lora.down.weight",
"...conv1.lora.down.weight", "...mlp.fc1.lora_linear_layer.down.weight") maps onto the same
modules; it carried no alphas.

DoRA files (PEFT `use_dora=True`) add one "<module path>.lora_magnitude_vector" per module, [out]
for a Linear, [1, out, 1, 1] for a conv; it travels with the module's pair (`RawPair.magnitude`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from sdserve.adapters.formats.common import RawPair, short
from sdserve.adapters.targets import COMPONENTS, TargetSpec, resolve_target
from sdserve.errors import AdapterError

METADATA_KEY = "lora_adapter_metadata"
# Bounds on the patterns of one config, whatever their form: a real config names at most every
# adapted module (a few thousand) by its path (well under 200 characters).
_MAX_PATTERN_CHARS = 1000
_MAX_PATTERNS = 10_000
# A pattern sdserve accepts: a module path, optionally "^"-anchored, its dots optionally escaped
# ("\." as `re.escape` writes them). The segments cannot contain "." or "\", so this fullmatch
# never backtracks (and the pattern is at most _MAX_PATTERN_CHARS long).
_MODULE_PATTERN = re.compile(r"\^?[A-Za-z0-9_]+(?:\\?\.[A-Za-z0-9_]+)*")

# Attention-processor LoRA names -> the projection module they adapt, per component family.
_UNET_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_CLIP_PROCESSOR = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}

_Value = TypeVar("_Value", int, float)


@dataclass(frozen=True)
class _PatternTable(Generic[_Value]):
    r"""A config's `rank_pattern` or `alpha_pattern`, matched as PEFT matches literal patterns.

    PEFT's `get_pattern_key` returns the first key P (in the file's order) for which
    `re.match(rf"(.*\.)?({P})$", path)` holds. The keys come from an untrusted header, and a
    backtracking matcher over a hostile pattern and a path from the file's own keys can hold the
    GIL for minutes, so no regex is ever built from them. The patterns PEFT and diffusers write
    are module paths, for which that rule means: with a leading "^", P equals the whole path (the
    caret only matches at position 0, so "(.*\.)?" must be empty); without, P equals the path or
    one of its dotted suffixes. Both are dictionary lookups, one per segment of the path.
    """

    whole: dict[str, tuple[int, _Value]]  # "^"-anchored module path -> (order in file, value)
    suffix: dict[str, tuple[int, _Value]]  # unanchored module path -> (order in file, value)

    def lookup(self, module_path: str) -> _Value | None:
        """The value of the first pattern in file order that matches `module_path`, if any."""
        if not self.whole and not self.suffix:
            return None  # the common config: no patterns (a LoRA load asks twice per module)
        hits = [self.whole[module_path]] if module_path in self.whole else []
        start = 0
        while True:
            hit = self.suffix.get(module_path[start:])
            if hit is not None:
                hits.append(hit)
            dot = module_path.find(".", start)
            if dot < 0:
                break
            start = dot + 1
        return min(hits)[1] if hits else None


def _pattern_table(name: str, field: str, patterns: Mapping[str, _Value]) -> _PatternTable[_Value]:
    whole: dict[str, tuple[int, _Value]] = {}
    suffix: dict[str, tuple[int, _Value]] = {}
    for order, (pattern, value) in enumerate(patterns.items()):
        if not _MODULE_PATTERN.fullmatch(pattern):
            raise AdapterError(name, f"{METADATA_KEY}: {field} key {short(pattern, 60)!r} is not a module path")
        table = whole if pattern.startswith("^") else suffix
        # Two spellings of one path ("a.b", "a\.b"): the first in file order wins, as in PEFT.
        table.setdefault(pattern.removeprefix("^").replace("\\.", "."), (order, value))
    return _PatternTable(whole, suffix)


@dataclass(frozen=True)
class _Config:
    """The parts of a PEFT LoraConfig that decide a module's rank and scale."""

    r: int | None
    lora_alpha: float | None
    rank_pattern: _PatternTable[int]
    alpha_pattern: _PatternTable[float]
    use_rslora: bool

    def alpha_for(self, module_path: str) -> float | None:
        alpha = self.alpha_pattern.lookup(module_path)
        return alpha if alpha is not None else self.lora_alpha

    def rank_for(self, module_path: str) -> int | None:
        rank = self.rank_pattern.lookup(module_path)
        return rank if rank is not None else self.r


def _shown(value: object) -> str:
    return short(repr(value), 40)


def _positive_int(name: str, field: str, value: object) -> int:
    # `type` rather than isinstance: JSON true is a bool, which Python counts as an int.
    if type(value) is not int or value < 1:
        raise AdapterError(name, f"{METADATA_KEY}: {field} must be a positive integer (got {_shown(value)})")
    return value


def _finite(name: str, field: str, value: object) -> float:
    # Python's json reads NaN, Infinity and 1e400 (as inf); none of them is an alpha.
    if type(value) not in (int, float) or not math.isfinite(value):
        raise AdapterError(name, f"{METADATA_KEY}: {field} must be a finite number (got {_shown(value)})")
    return float(value)


def _patterns(name: str, field: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterError(name, f"{METADATA_KEY}: {field} must be an object (got {_shown(value)})")
    if len(value) > _MAX_PATTERNS or any(len(key) > _MAX_PATTERN_CHARS for key in value):
        raise AdapterError(name, f"{METADATA_KEY}: {field} has more than {_MAX_PATTERNS} keys "
                                 f"or a key longer than {_MAX_PATTERN_CHARS} characters")
    return value


def _parse_config(name: str, prefix: str, raw: Mapping[str, Any]) -> _Config:
    """Check every number the config gives; `prefix` ("unet." or "") names fields as the file does."""
    rank_field, alpha_field = f"{prefix}rank_pattern", f"{prefix}alpha_pattern"
    rank_pattern = {
        pattern: _positive_int(name, f"{rank_field} value for {short(pattern, 60)!r}", value)
        for pattern, value in _patterns(name, rank_field, raw.get("rank_pattern")).items()
    }
    alpha_pattern = {
        pattern: _finite(name, f"{alpha_field} value for {short(pattern, 60)!r}", value)
        for pattern, value in _patterns(name, alpha_field, raw.get("alpha_pattern")).items()
    }
    r, alpha, rslora = raw.get("r"), raw.get("lora_alpha"), raw.get("use_rslora")
    if rslora is not None and type(rslora) is not bool:
        raise AdapterError(name, f"{METADATA_KEY}: {prefix}use_rslora must be true or false (got {_shown(rslora)})")
    return _Config(
        r=None if r is None else _positive_int(name, f"{prefix}r", r),
        lora_alpha=None if alpha is None else _finite(name, f"{prefix}lora_alpha", alpha),
        rank_pattern=_pattern_table(name, rank_field, rank_pattern),
        alpha_pattern=_pattern_table(name, alpha_field, alpha_pattern),
        use_rslora=bool(rslora),
    )


def parse_configs(name: str, metadata: Mapping[str, str]) -> dict[str, _Config] | None:
    """Per-component LoRA configs from the header; key "" holds an unprefixed (model-level) one."""
    raw_text = metadata.get(METADATA_KEY)
    if not raw_text:
        return None
    try:
        raw = json.loads(raw_text)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
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
    return {
        component: _parse_config(name, f"{component}." if component else "", fields)
        for component, fields in grouped.items()
    }


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
    for suffix, role in ((".lora_A.weight", "down"), (".lora_B.weight", "up"),
                         (".lora_magnitude_vector", "magnitude"), (".lora_magnitude_vector.weight", "magnitude")):
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
    # target -> role -> (key, tensor, component, module as the file spells them)
    factors: dict[str, dict[str, tuple[str, torch.Tensor, str, str]]] = {}
    for key, tensor in tensors.items():
        found = _role_and_module(key)
        if found is None:
            raise AdapterError(name, f"unexpected key {short(key)!r} in a LoRA file")
        role, component, module = found
        target = f"{component}.{module}"
        slot = factors.setdefault(resolve_target(target, targets) or target, {})
        if role in slot:
            raise AdapterError(name, f"two LoRA weights for the same module ({short(key)!r})")
        slot[role] = (key, tensor, component, module)

    pairs: list[RawPair] = []
    for target, slot in factors.items():
        if "down" not in slot or "up" not in slot:
            present = next(iter(slot.values()))[0]
            raise AdapterError(name, f"LoRA key {short(present)!r} has no matching up/down partner")
        # Config patterns (often "^"-anchored) were written against the file's own spelling
        # of the module path, so they are matched against that, not the resolved target.
        down_key, down, component, module = slot["down"]
        up = slot["up"][1]
        magnitude_key, magnitude = slot["magnitude"][:2] if "magnitude" in slot else (None, None)
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
                magnitude=magnitude,
                magnitude_key=magnitude_key,
            )
        )
    return pairs

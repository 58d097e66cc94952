"""A LoRA extracted from a fine-tuned model: the difference to its base, truncated by SVD.

For every module a LoRA can target (`targets_of`: the linear and non-grouped conv layers) the
weight difference ΔW = W_tuned − W_base, a conv's flattened to `[out, in·kh·kw]`, is factored
as U·S·Vh and kept to its R largest singular values: the best rank-R approximation in the
Frobenius norm (Eckart–Young), which is what kohya's `extract_lora_from_models.py` computes too.
The factors are split evenly, down A = √S·Vh `[r, in·kh·kw]` and up B = U·√S `[out, r]`, so
neither carries all of ΔW's magnitude (better conditioned in float16), and alpha = r, so the
scale is 1 and a loader's product B·A is the approximation itself.

A module's relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F is read off the singular values it dropped,
√(Σ_{i>r} s_i²) / √(Σ s_i²): exact, with no second product. Modules whose ΔW is all below
`min_delta` in magnitude are skipped (unchanged by the fine-tune, or changed only by the
rounding of a save in lower precision). Biases, norms and embeddings have no LoRA form; a
changed bias is counted so the caller can say what the file leaves out.

This module works on loaded components (the leaf rule of sdserve.adapters); loading models by
name is the CLI's (`sdserve adapters extract`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import safetensors.torch
import torch
from torch import nn
from tqdm import tqdm

from sdserve.adapters.formats.common import RawPair
from sdserve.adapters.lora import DEFAULT_MAX_RANK, LoRAAdapter, ParsedLoRA, validate_lora
from sdserve.adapters.save import lora_state_dict
from sdserve.adapters.targets import TargetSpec, targets_of
from sdserve.errors import InvalidArgument

LAYOUTS = {"diffusers": "peft", "kohya": "kohya"}  # --format -> save.lora_state_dict's layout


@dataclass(frozen=True)
class ExtractConfig:
    """What an extraction keeps; the `sdserve adapters extract` flags mirror these fields."""

    rank: int = 32
    """Largest rank of every module's factors (a module narrower than it keeps its full rank)."""
    text_encoder: bool = False
    """Also extract the text encoders' differences (default: the UNet's only)."""
    min_delta: float = 1e-6
    """A module is skipped when every |ΔW| entry is at most this (in weight units)."""
    device: str = "cpu"
    """Where the SVDs run ("cpu", "cuda", "cuda:N"); the result is on the CPU either way."""


def check_config(config: ExtractConfig) -> None:
    """One-line errors naming the flag, before any model is loaded."""
    if not 1 <= config.rank <= DEFAULT_MAX_RANK:
        raise InvalidArgument(f"must be between 1 and {DEFAULT_MAX_RANK}, the largest rank sdserve serves "
                              f"(got {config.rank})", field="--rank")
    if not (math.isfinite(config.min_delta) and config.min_delta >= 0):
        raise InvalidArgument(f"must be a number >= 0 (got {config.min_delta})", field="--min-delta")


@dataclass(frozen=True)
class ModuleError:
    """How well one module's rank-r factors reproduce its ΔW."""

    target: str
    rank: int
    relative_error: float  # ‖ΔW − B·A‖_F / ‖ΔW‖_F
    delta_norm: float  # ‖ΔW‖_F


@dataclass(frozen=True)
class Extraction:
    """An extracted LoRA and what it does and does not hold."""

    adapter: LoRAAdapter
    errors: tuple[ModuleError, ...]  # one per extracted module, by target
    skipped: tuple[str, ...]  # targets whose ΔW is below min_delta
    changed_biases: tuple[str, ...] = ()  # extracted or skipped targets whose bias changed (not in a LoRA)
    changed_elsewhere: tuple[str, ...] = ()  # components not extracted that differ (text encoders without --text-encoder)
    metadata: Mapping[str, str] = field(default_factory=dict)  # provenance for the file's header

    @property
    def max_error(self) -> float:
        return max((e.relative_error for e in self.errors), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(e.relative_error for e in self.errors) / len(self.errors) if self.errors else 0.0


def _dims(spec: TargetSpec) -> str:
    if spec.kind == "linear":
        return f"linear [{spec.out_features}, {spec.in_features}]"
    return f"conv [{spec.out_features}, {spec.in_features}, {spec.kernel_size[0]}, {spec.kernel_size[1]}]"


def check_same_architecture(
    base: Mapping[str, nn.Module], tuned: Mapping[str, nn.Module], base_name: str, tuned_name: str
) -> dict[str, TargetSpec]:
    """The base model's targets, after checking the tuned model has exactly the same ones (names
    and shapes); InvalidArgument naming both models and the first difference otherwise."""
    def differ(detail: str) -> InvalidArgument:
        return InvalidArgument(f"--base {base_name} and --tuned {tuned_name} are different architectures ({detail})")

    if set(base) != set(tuned):
        only_one = ", ".join(sorted(set(base) ^ set(tuned)))
        raise differ(f"only one has {only_one}")
    base_targets, tuned_targets = targets_of(base), targets_of(tuned)
    for target in sorted(set(base_targets) | set(tuned_targets)):
        ours, theirs = base_targets.get(target), tuned_targets.get(target)
        if ours is None or theirs is None:
            raise differ(f"module {target!r} is only in {'--tuned' if ours is None else '--base'}")
        if ours != theirs:
            raise differ(f"module {target!r} is {_dims(ours)} in one and {_dims(theirs)} in the other")
    return base_targets


def _weights(components: Mapping[str, nn.Module], target: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    component, _, path = target.partition(".")
    module = components[component].get_submodule(path)
    return module.weight.detach(), (module.bias.detach() if module.bias is not None else None)


def _low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down [r, cols], up [out, r], relative error) of ΔW [out, cols]'s rank-r truncation."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # [out, k], [k], [k, cols]
    root = s[:rank].sqrt()  # [r]
    down = root[:, None] * vh[:rank]  # [r, cols]
    up = u[:, :rank] * root[None, :]  # [out, r]
    energy = s.double().square()  # [k]
    total = float(energy.sum())
    error = math.sqrt(float(energy[rank:].sum()) / total) if total > 0 else 0.0
    return down, up, error


@torch.no_grad()
def extract_lora(
    base: Mapping[str, nn.Module],
    tuned: Mapping[str, nn.Module],
    config: ExtractConfig,
    *,
    base_name: str = "base",
    tuned_name: str = "tuned",
    progress: bool = False,
) -> Extraction:
    """The rank-`config.rank` LoRA that turns `base` into (approximately) `tuned`.

    `base` and `tuned` map component names ("unet", "text_encoder", "text_encoder_2") to the two
    models' modules, of the same architecture (checked: InvalidArgument naming both otherwise).
    InvalidArgument too when no module differs by more than `config.min_delta`.
    """
    check_config(config)
    targets = check_same_architecture(base, tuned, base_name, tuned_name)
    wanted = [t for t in targets if t.startswith("unet.") or (config.text_encoder and t.startswith("text_encoder"))]
    device = torch.device(config.device)
    pairs: list[RawPair] = []
    errors: list[ModuleError] = []
    skipped: list[str] = []
    changed_biases: list[str] = []
    for target in tqdm(wanted, desc="extract", unit="module", disable=not progress, dynamic_ncols=True):
        spec = targets[target]
        base_weight, base_bias = _weights(base, target)
        tuned_weight, tuned_bias = _weights(tuned, target)
        if base_bias is not None and tuned_bias is not None and not torch.equal(base_bias, tuned_bias):
            changed_biases.append(target)
        delta = tuned_weight.to(device, torch.float32) - base_weight.to(device, torch.float32)  # W's shape
        delta = delta.reshape(spec.out_features, spec.a_columns)  # [out, in·kh·kw]
        if not bool(delta.abs().amax() > config.min_delta):
            skipped.append(target)
            continue
        rank = min(config.rank, spec.out_features, spec.a_columns)
        down, up, error = _low_rank(delta, rank)
        if spec.kind == "conv":
            down = down.reshape(rank, spec.in_features, *spec.kernel_size)  # [r, in, kh, kw]
            up = up.reshape(spec.out_features, rank, 1, 1)  # [out, r, 1, 1]
        pairs.append(RawPair(target=target, down=down.cpu().contiguous(), up=up.cpu().contiguous(),
                             alpha=float(rank), use_rslora=False, key=target))
        errors.append(ModuleError(target, rank, error, float(delta.norm())))
    if not pairs:
        raise InvalidArgument(f"--tuned {tuned_name} does not differ from --base {base_name} in any "
                              f"{'UNet or text-encoder' if config.text_encoder else 'UNet'} module by more "
                              f"than --min-delta {config.min_delta:g}")
    adapter = validate_lora(ParsedLoRA(layout="peft", pairs=pairs, is_slider=False), tuned_name, targets,
                            max_rank=DEFAULT_MAX_RANK)
    return Extraction(
        adapter=adapter,
        errors=tuple(sorted(errors, key=lambda e: e.target)),
        skipped=tuple(skipped),
        changed_biases=tuple(changed_biases),
        changed_elsewhere=_changed_elsewhere(base, tuned, targets, wanted, config.min_delta),
        metadata=MappingProxyType({
            "sdserve_method": "extract",
            "sdserve_base_model": base_name,
            "sdserve_tuned_model": tuned_name,
            "sdserve_rank": str(config.rank),
            "sdserve_alpha": "rank",  # alpha equals each module's rank: scale 1
            "sdserve_min_delta": f"{config.min_delta:g}",
            "sdserve_modules": str(len(pairs)),
            "sdserve_max_relative_error": f"{max(e.relative_error for e in errors):.6g}",
        }),
    )


def _changed_elsewhere(
    base: Mapping[str, nn.Module], tuned: Mapping[str, nn.Module], targets: Mapping[str, TargetSpec],
    wanted: list[str], min_delta: float,
) -> tuple[str, ...]:
    """Components left out of the extraction whose targeted weights differ: a text encoder
    fine-tuned alongside the UNet, which the caller may want to extract too."""
    chosen = set(wanted)
    changed = set()
    for target in targets:
        component = target.partition(".")[0]
        if target in chosen or component in changed:
            continue
        (ours, _), (theirs, _) = _weights(base, target), _weights(tuned, target)
        if bool((theirs.float() - ours.float()).abs().amax() > min_delta):
            changed.add(component)
    return tuple(sorted(changed))


def write_extraction(extraction: Extraction, path: Path, format: str = "diffusers",
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write the extracted LoRA with save.lora_state_dict's tensors and header (diffusers/PEFT
    or kohya keys), plus the extraction's provenance and `metadata` in the safetensors header."""
    if format not in LAYOUTS:
        raise InvalidArgument(f"must be diffusers or kohya (got {format})", field="--format")
    tensors, header = lora_state_dict(extraction.adapter, LAYOUTS[format])  # type: ignore[arg-type]
    header = {"format": "pt", **extraction.metadata, **(metadata or {}), "sdserve_format": format, **header}
    safetensors.torch.save_file(tensors, str(path), metadata=header)

"""What every layout parser produces: one down/up pair (or one LyCORIS module) per target, not yet validated."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RawPair:
    """A LoRA pair as found in the file, before shape, rank and value checks.

    `alpha` None means the file gives none (the scale is then 1: alpha = rank).
    `key` is the file's key of the down matrix, quoted in error messages.
    """

    target: str  # "<component>.<module path>"
    down: torch.Tensor  # [r, in] or [r, in, kh, kw], file dtype
    up: torch.Tensor  # [out, r] or [out, r, 1, 1], file dtype
    alpha: float | None
    use_rslora: bool
    key: str
    config_rank: int | None = None  # the rank a PEFT config declares for this module, if any
    # "lora" for a pair read from the file; "loha"/"lokr" for the exact LoRA form of a LyCORIS
    # module (`adapters.lycoris`), whose file ranks were checked there: its own rank is bounded
    # by the module's shape, not by the limit on files' ranks.
    source: str = "lora"
    # DoRA: the file's magnitude vector (PEFT "lora_magnitude_vector", kohya/LyCORIS "dora_scale")
    # as found, and its key; None for a plain LoRA. Checked and flattened to [out] by validation.
    magnitude: torch.Tensor | None = None
    magnitude_key: str | None = None


@dataclass(frozen=True)
class RawLycoris:
    """A LyCORIS module (LoHa or LoKr) as found in a kohya-layout file, before any check.

    `tensors` maps the role (the key's suffix without its dot: "hada_w1_a", "lokr_w2", ...) to
    (the file's key, the tensor in the file's dtype); `alpha` None means the file gives none.
    """

    target: str  # "<component>.<module path>"
    kind: str  # "loha" | "lokr"
    tensors: dict[str, tuple[str, torch.Tensor]]
    alpha: float | None
    key: str  # the module's first key in the file, quoted in error messages


def short(key: str, limit: int = 120) -> str:
    """A file key as quoted in an error: clipped, since keys come from untrusted files."""
    return key if len(key) <= limit else key[: limit - 3] + "..."

"""What every layout parser produces: one down/up pair per target module, not yet validated."""

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


def short(key: str, limit: int = 120) -> str:
    """A file key as quoted in an error: clipped, since keys come from untrusted files."""
    return key if len(key) <= limit else key[: limit - 3] + "..."

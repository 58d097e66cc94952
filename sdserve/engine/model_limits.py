"""What a model gives a request's absent fields, and the bounds a request must respect.

Engine types (the engine validates requests against them; the server's admission estimates cost
from them; `ListModels` lists them field for field). Built-in models record theirs in
`sdserve/models/configs.py`; a model directory's `sdserve.json` may carry them too. Plain
dataclasses with no imports, so `sdserve.models` and the server read them without the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDefaults:
    """What a request's absent fields take for this model."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    guidance_start: float = 0.0
    """Fraction of the schedule where classifier-free guidance starts (the request's guidance_start)."""
    guidance_end: float = 1.0
    """Fraction of the schedule where it ends. A model that guidance over-sharpens at low noise
    records less than 1 here (the shapes model: guidance late in the schedule bends its squares'
    sides in; see docs/benchmarks.md)."""


@dataclass(frozen=True)
class ModelLimits:
    """Bounds a request must respect for this model."""

    max_steps: int = 250
    """Most denoising steps one request may ask for (schedulers may lower it, e.g. LCM)."""
    min_side: int = 8
    """Smallest width/height in pixels."""
    max_side: int = 2048
    """Largest width/height in pixels."""
    max_pixels: int = 2048 * 2048
    """Largest width × height."""
    max_num_images: int = 8
    """Most images one request may ask for."""

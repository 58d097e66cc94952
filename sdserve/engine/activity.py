"""When is a piece of per-request conditioning active? One rule, one function, every kind.

Active at step i of N (N = the UNet evaluations the request's scheduler runs) exactly when
`i / N >= start and (i + 1) / N <= end`: diffusers' ControlNet rule (control_guidance_start/end).
Adapters, ControlNet units and anything later with a start/end all ask this function.
"""

from __future__ import annotations


def active_at(step: int, num_steps: int, start: float, end: float) -> bool:
    return not (step / num_steps < start or (step + 1) / num_steps > end)

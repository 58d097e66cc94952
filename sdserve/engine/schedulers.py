"""Noise schedulers: names, aliases, limits, and one fresh instance per request.

A scheduler name is a diffusers class name, meaning `<Class>.from_config(model's scheduler
config)`, or an alias that may add config overrides. Each request owns its instance: scheduler
state (step index, multistep history) never leaks between requests.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import diffusers

from sdserve.errors import InvalidArgument

SUPPORTED_CLASSES = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
)


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str
    overrides: dict[str, Any] = field(default_factory=dict)


ALIASES: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler"),
    "ddpm": SchedulerChoice("DDPMScheduler"),
    "pndm": SchedulerChoice("PNDMScheduler"),
    "euler": SchedulerChoice("EulerDiscreteScheduler"),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "heun": SchedulerChoice("HeunDiscreteScheduler"),
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": SchedulerChoice("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": SchedulerChoice("UniPCMultistepScheduler"),
    "lcm": SchedulerChoice("LCMScheduler"),
}


def scheduler_names() -> list[str]:
    return list(ALIASES) + list(SUPPORTED_CLASSES)


def resolve_scheduler(name: str) -> SchedulerChoice:
    if name in ALIASES:
        return ALIASES[name]
    if name in SUPPORTED_CLASSES:
        return SchedulerChoice(name)
    raise InvalidArgument(
        f"unknown scheduler {name[:64]!r}; choose one of {', '.join(scheduler_names())}", field="scheduler"
    )


def max_steps_for(choice: SchedulerChoice, base_config: dict[str, Any]) -> int:
    """The most steps diffusers lets this scheduler take with this model's config."""
    limit = int(base_config.get("num_train_timesteps", 1000))
    if choice.class_name == "LCMScheduler":
        # LCM samples from a fixed sub-schedule of `original_inference_steps` timesteps.
        limit = min(limit, int(base_config.get("original_inference_steps", 50)))
    return limit


def make_scheduler(choice: SchedulerChoice, base_config: dict[str, Any]):
    cls = getattr(diffusers, choice.class_name)
    return cls.from_config(base_config, **choice.overrides)


@cache
def step_kwargs_accepted(class_name: str) -> tuple[bool, bool]:
    """(accepts eta, accepts generator) of `<class>.step`, as diffusers' pipelines check."""
    params = inspect.signature(getattr(diffusers, class_name).step).parameters
    return "eta" in params, "generator" in params

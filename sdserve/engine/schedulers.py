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
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
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
    "euler_karras": SchedulerChoice("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2": SchedulerChoice("KDPM2DiscreteScheduler"),
    "dpm2_a": SchedulerChoice("KDPM2AncestralDiscreteScheduler"),
    # DPM++ 2M SDE: diffusers' noise comes from the request's generator (A1111's from torchsde's
    # Brownian tree), so the same sampler, not the same pixels as A1111.
    "dpmpp_2m_sde": SchedulerChoice("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": SchedulerChoice(
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}
    ),
}


# A1111's sampler names (as its UI and its PNG `parameters` spell them) and its legacy `k_` aliases
# -> sdserve's alias. Matched without regard to case. A name A1111 has and sdserve lacks ("DPM++ SDE",
# "LMS": diffusers' LMS needs scipy, not a dependency; "DPM++ 2S a", ...) is refused as unknown
# rather than mapped to a near miss.
# "DPM++ 2M" is the legacy (pre-1.9) meaning: uniform sigmas; A1111 1.9+ writes the Karras form as
# "DPM++ 2M" with "Schedule type: Karras" (see `from_a1111`).
A1111_SAMPLERS: dict[str, str] = {
    "Euler a": "euler_a",
    "Euler": "euler",
    "Heun": "heun",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DDIM": "ddim",
    "DDPM": "ddpm",
    "PLMS": "pndm",  # diffusers' PNDM with skip_prk_steps, as SD configs ship it, is PLMS
    "UniPC": "unipc",
    "LCM": "lcm",
    "Euler Karras": "euler_karras",  # A1111 1.9+: "Euler" + "Schedule type: Karras"
    "DPM2": "dpm2",
    "DPM2 a": "dpm2_a",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "k_dpm_2": "dpm2",
    "k_dpm_2_a": "dpm2_a",
    "k_euler_a": "euler_a",
    "k_euler_ancestral": "euler_a",
    "k_euler": "euler",
    "k_heun": "heun",
    "k_dpmpp_2m": "dpmpp_2m",
    "k_dpmpp_2m_ka": "dpmpp_2m_karras",
}
_A1111_LOWER = {name.lower(): alias for name, alias in A1111_SAMPLERS.items()}
# sdserve alias -> (A1111 sampler, Schedule type) as written into PNGs; "" = no Schedule type
# (A1111's DDIM/PLMS/UniPC/DDPM/LCM take their own schedules).
_TO_A1111: dict[str, tuple[str, str]] = {
    "euler_a": ("Euler a", "Uniform"),
    "euler": ("Euler", "Uniform"),
    "heun": ("Heun", "Uniform"),
    "dpmpp_2m": ("DPM++ 2M", "Uniform"),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "ddim": ("DDIM", ""),
    "ddpm": ("DDPM", ""),
    "pndm": ("PLMS", ""),
    "unipc": ("UniPC", ""),
    "lcm": ("LCM", ""),
    "euler_karras": ("Euler", "Karras"),
    "dpm2": ("DPM2", "Uniform"),
    "dpm2_a": ("DPM2 a", "Uniform"),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", "Uniform"),
    "dpmpp_2m_sde_karras": ("DPM++ 2M SDE", "Karras"),
}


def scheduler_names() -> list[str]:
    return list(ALIASES) + list(SUPPORTED_CLASSES)


def resolve_scheduler(name: str) -> SchedulerChoice:
    if name in ALIASES:
        return ALIASES[name]
    if name in SUPPORTED_CLASSES:
        return SchedulerChoice(name)
    if name.lower() in _A1111_LOWER:
        return ALIASES[_A1111_LOWER[name.lower()]]
    raise InvalidArgument(
        f"unknown scheduler {name[:64]!r}; choose one of {', '.join(scheduler_names())} "
        f"or an A1111 sampler name ({', '.join(list(A1111_SAMPLERS)[:10])})",
        field="scheduler",
    )


def to_a1111(name: str) -> tuple[str, str]:
    """(A1111 sampler, Schedule type) of a scheduler name sdserve accepts; a scheduler A1111 has
    no name for keeps its sdserve name (and no schedule type), as does one it does not know: a
    PNG's metadata must never fail the request it describes."""
    try:
        choice = resolve_scheduler(name)
    except InvalidArgument:
        return name, ""
    for alias, pair in _TO_A1111.items():
        if ALIASES[alias] == choice:
            return pair
    return name, ""


def from_a1111(sampler: str, schedule_type: str = "") -> str:
    """The sdserve scheduler name of an A1111 `Sampler` (+ `Schedule type`) pair as A1111 1.x writes
    it: legacy names ("DPM++ 2M Karras", no schedule type) and 1.9+ pairs ("DPM++ 2M" + "Karras")
    both read. A schedule sdserve does not implement for that sampler is refused."""
    schedule = schedule_type.strip().lower()
    if schedule == "karras" and not sampler.lower().endswith("karras"):
        sampler = f"{sampler} Karras"
    elif schedule not in ("", "automatic", "uniform", "karras"):
        raise InvalidArgument(f"schedule type {schedule_type[:32]!r} is not implemented", field="scheduler")
    alias = _A1111_LOWER.get(sampler.lower())
    if alias is None:
        resolve_scheduler(sampler)  # an sdserve name written as-is, or the unknown-scheduler error
        return sampler
    return alias


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

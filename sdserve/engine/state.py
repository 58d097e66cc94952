"""One running request: its own noise scheduler, generator, latents and conditioning.

Nothing in a `RequestState` is shared with another request, which is what makes a request's
image independent of its batch-mates (ARCHITECTURE rule 4).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from sdserve.engine.activity import active_at
from sdserve.engine.controlnet import PreparedControl, prepare_controls
from sdserve.engine.families import RowConditioning, family_of
from sdserve.engine.families.base import TextOptions
from sdserve.engine.init_latents import Inpainting, prepare_latents, strength_timesteps
from sdserve.engine.ip_adapter import IPAdapterWeights, PreparedIP
from sdserve.engine.model import LoadedModel
from sdserve.engine.request import EngineRequest
from sdserve.engine.row_context import RowContext
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler, step_kwargs_accepted

GroupKey = tuple[str, int, int, int]  # (model name, latent height, latent width, text tokens)


@dataclass
class Timings:
    submitted: float = field(default_factory=time.monotonic)
    adapters_waiting: float | None = None  # first admission attempt that found adapters cold
    admitted: float | None = None
    first_step: float | None = None
    denoised: float | None = None
    decoded: float | None = None

    def as_dict(self) -> dict[str, float]:
        """Seconds spent queued, waiting for adapters to load, denoising and decoding."""
        admitted = self.admitted or self.submitted
        denoised = self.denoised or admitted
        waiting = self.adapters_waiting or admitted
        return {
            "queue": waiting - self.submitted,
            "adapter_load": admitted - waiting,
            "denoise": denoised - admitted,
            "decode": (self.decoded or denoised) - denoised,
        }


@dataclass
class RequestState:
    request: EngineRequest
    model: LoadedModel
    arrival: int  # admission order, for fair ordering inside a size group
    scheduler: Any
    generator: torch.Generator
    timesteps: torch.Tensor  # [num_steps] in the scheduler's dtype (Euler's are fractional)
    latents: torch.Tensor  # [num_images, C, h, w]
    conditioning: RowConditioning
    step_kwargs: dict[str, Any]
    timings: Timings
    inpainting: Inpainting | None = None
    controls: list[PreparedControl] = field(default_factory=list)
    ip_branches: list[PreparedIP] = field(default_factory=list)
    adapter_slots: tuple[int, ...] = ()  # device slot of each stack entry, pinned while running
    step_index: int = 0
    last_tick: int = -1  # batcher tick at which this request last stepped

    def stack_at(self, step: int) -> list[tuple[int, float]]:
        """(slot, scale) of the adapters active at `step`, in stack order."""
        return [
            (slot, entry.scale)
            for slot, entry in zip(self.adapter_slots, self.request.adapters)
            if active_at(step, self.num_steps, entry.start, entry.end)
        ]

    def guided_at(self, step: int) -> bool:
        """Whether `step` runs classifier-free guidance: the scale is > 1 and the step lies in the
        request's guidance interval (the activity rule every start/end range shares)."""
        request = self.request
        return request.guidance and active_at(step, self.num_steps, request.guidance_start, request.guidance_end)

    def conditioning_rows(self, guided: bool) -> slice:
        """The rows of the prepared conditioning a step reads: all of them, or, when the request
        guides but not at this step, its conditional half (rows are `[uncond × n, cond × n]`)."""
        n = self.request.num_images
        if self.request.guidance and not guided:
            return slice(n, 2 * n)
        return slice(0, 2 * n if guided else n)

    @property
    def num_steps(self) -> int:
        """UNet evaluations the scheduler asks for: the N of the step-activity rule."""
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def rows(self) -> int:
        return self.request.rows

    @property
    def group_key(self) -> GroupKey:
        # A1111-syntax prompts can be longer than 77 tokens: rows share a UNet call only when
        # their text states have one length (padding them would change what each row attends to).
        tokens = self.conditioning.encoder_hidden_states.shape[1]
        return (self.model.info.name, self.latents.shape[-2], self.latents.shape[-1], tokens)


def prepare_state(
    request: EngineRequest,
    model: LoadedModel,
    arrival: int,
    timings: Timings,
    adapter_slots: tuple[int, ...] = (),
    ip_weights: Sequence[IPAdapterWeights] = (),
) -> RequestState:
    """Encode the prompts and draw the initial noise, in diffusers' order of generator use.

    `request` has its embeddings and hypernetworks bound (`residency.RequestWeights.bind`);
    `ip_weights` are its IP-Adapters' loaded weights, one per unit, from the residency store.
    """
    info = model.info
    family = family_of(info.family)
    choice = resolve_scheduler(request.scheduler)
    handed = request.prepared_scheduler.take() if request.prepared_scheduler is not None else None
    scheduler = handed if handed is not None else make_scheduler(choice, info.scheduler_config)
    if handed is None or model.device.type != "cpu":
        # Validation set the timesteps on the CPU; a GPU model wants them (and sigmas) on its device.
        scheduler.set_timesteps(request.steps, device=model.device)
    timesteps = scheduler.timesteps
    if request.init_image is not None:
        timesteps = strength_timesteps(scheduler, request.steps, request.strength)
    num_steps = len(timesteps)
    # Prompts are encoded once, so an adapter's text-encoder part applies when it is active at
    # the first step. Every text-encoder call encodes one prompt: one row, reading that stack and
    # the request's textual inversions.
    text_stack = tuple(
        (slot, entry.scale)
        for slot, entry in zip(adapter_slots, request.adapters)
        if active_at(0, num_steps, entry.start, entry.end)
    )
    text_rows = RowContext(lora=(text_stack,), embeddings=(request.embeddings,))
    with torch.inference_mode(), _adapter_rows(model, text_rows):
        conditioning = family.encode(
            model,
            request.prompt,
            request.negative_prompt,
            request.guidance,
            request.num_images,
            request.width,
            request.height,
            request.embeddings,
            TextOptions(syntax=request.prompt_syntax, clip_skip=request.clip_skip),
        )
    generator = torch.Generator("cpu").manual_seed(request.seed)
    with torch.inference_mode():
        latents, inpainting = prepare_latents(request, model, scheduler, generator, timesteps)
    if len(ip_weights) != len(request.ip_adapters):
        raise ValueError("prepare_state needs the loaded weights of every IP-Adapter unit")
    ip_branches = []
    for unit, weights in zip(request.ip_adapters, ip_weights):
        tokens = weights.image_tokens(unit.image, request.num_images, request.guidance)
        ip_branches.append(PreparedIP(weights, tokens, unit.scale))
    takes_eta, takes_generator = step_kwargs_accepted(choice.class_name)
    step_kwargs: dict[str, Any] = {}
    if takes_eta:
        step_kwargs["eta"] = 0.0
    if takes_generator:
        step_kwargs["generator"] = generator
    return RequestState(
        request=request,
        model=model,
        arrival=arrival,
        scheduler=scheduler,
        generator=generator,
        timesteps=timesteps,
        latents=latents,
        inpainting=inpainting,
        controls=prepare_controls(request, model),
        ip_branches=ip_branches,
        conditioning=conditioning,
        step_kwargs=step_kwargs,
        timings=timings,
        adapter_slots=adapter_slots,
    )


def _adapter_rows(model: LoadedModel, rows: RowContext):
    """The model's calls inside the block read `rows` (a model never wrapped has nothing to read)."""
    if model.adapters is None:
        return nullcontext()
    return model.adapters.rows(rows)

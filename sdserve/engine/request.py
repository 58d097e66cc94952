"""The engine's request types: `RequestSpec` (what a caller asked, absent fields None) and
`EngineRequest` (the validated domain form of the proto's GenerateRequest, defaults resolved).

`resolve` is the one place requests are validated; every rule failure is an `InvalidArgument`
that names the field and the rule. It reads no weights: adapter files, embeddings, hypernetworks
and conditioning models are loaded by the residency store (engine/store.py) when the engine
admits the request. The one exception is a cold embedding, whose safetensors header (not its
data) is read to check its tokens and widths up front; one the store holds is checked from the
store. The noise scheduler built here to check the step count is the one the request runs with.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdserve.api.types import (
    AdapterSpec,
    EmbeddingSpec,
    HypernetworkSpec,
    RequestSpec,
)
from sdserve.engine.activity import active_at
from sdserve.engine.controlnet import ControlNetStore, ControlUnit, resolve_units
from sdserve.engine.ip_adapter import IPAdapterStore, IPAdapterUnit, resolve_ip_units
from sdserve.engine.model import ModelInfo
from sdserve.engine.schedulers import make_scheduler, max_steps_for, resolve_scheduler
from sdserve.engine.store import HeaderEntry, WeightKey, WeightStore, safetensors_header, zeros_file
from sdserve.errors import AdapterError, InvalidArgument

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 4096
MAX_GUIDANCE = 100.0
MAX_ADAPTER_SCALE = 100.0


MAX_STACK = 8  # adapters in one request's stack


@dataclass(frozen=True)
class StackEntry:
    """A validated stack entry. `source` is a file path the engine can read; `name` is what
    errors and responses call it (the registered name, or the file name for the CLI)."""

    name: str
    source: str
    scale: float
    start: float
    end: float
    digest: str = ""  # sha256 of the file's bytes when the caller knows it ("" = hash it once)


@dataclass(frozen=True)
class EmbeddingEntry:
    """A validated embedding: the store loads `source` at admission. `token` is the word the
    prompt uses (checked against the file's header); `digest` as for `StackEntry`."""

    name: str
    source: str
    token: str
    digest: str = ""


@dataclass(frozen=True)
class HypernetworkEntry:
    name: str
    source: str
    strength: float
    digest: str = ""


class PreparedScheduler:
    """The request's noise scheduler, built by validation (which sets its timesteps to check the
    step count) and handed to the request's first run, so one request builds one scheduler. A
    request object run again (the same EngineRequest submitted twice) gets a fresh one: a
    scheduler's state belongs to one run."""

    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler

    def take(self) -> Any | None:
        """The scheduler, once; None after (one owner takes it: the engine loop)."""
        scheduler, self._scheduler = self._scheduler, None
        return scheduler


@dataclass(frozen=True)
class EngineRequest:
    """A validated request with every default resolved; what the batcher schedules."""

    model: str
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str
    width: int
    height: int
    num_images: int
    adapters: tuple[StackEntry, ...] = ()
    init_image: Any = field(default=None, compare=False, repr=False)  # PIL RGB, width × height
    mask_image: Any = field(default=None, compare=False, repr=False)  # PIL L, width × height
    strength: float = 1.0  # fraction of the schedule run from the init image (1.0 without one)
    outpaint: tuple[int, int, int, int] | None = None
    controlnets: tuple[ControlUnit, ...] = field(default=(), compare=False, repr=False)
    ip_adapters: tuple[IPAdapterUnit, ...] = field(default=(), compare=False, repr=False)
    embedding_refs: tuple[EmbeddingEntry, ...] = ()  # what validation checked; loaded at admission
    hypernetwork_refs: tuple[HypernetworkEntry, ...] = ()
    # The loaded weights, bound at admission (`residency.RequestWeights.bind`) into the copy of the
    # request its running state holds; empty in what `resolve` returns.
    embeddings: tuple[Any, ...] = field(default=(), compare=False, repr=False)  # TextualInversion
    hypernetworks: tuple[tuple[Any, float], ...] = field(default=(), compare=False, repr=False)  # (net, strength)
    preview_every: int = 0  # a latent preview with every N-th step event (0: none)
    guidance_start: float = 0.0  # guidance interval, fractions of the schedule (activity rule)
    guidance_end: float = 1.0
    clip_skip: int = 1  # A1111's meaning: 1 = the layer the family reads natively (families/)
    prompt_syntax: str = "plain"  # "plain" | "a1111" (engine/prompt_syntax.py)
    request_id: str = ""
    tenant: str = ""
    deadline: float | None = field(default=None, compare=False)  # time.monotonic() seconds
    # What the request will cost the engine, known at validation (for admission: `cost`):
    unet_steps: int = field(default=0, compare=False)  # UNet evaluations its scheduler runs (the N of active_at)
    unet_row_steps: int = field(default=0, compare=False)  # Σ over those evaluations of the rows each runs
    control_row_steps: int = field(default=0, compare=False)  # Σ over ControlNet units of the rows they run
    prepared_scheduler: PreparedScheduler | None = field(default=None, compare=False, repr=False)

    @property
    def cost(self) -> int:
        """Pixels × UNet row-evaluations, plus the ControlNet row-evaluations counted like the
        UNet's (a ControlNet is a UNet's encoder half: an upper bound). Exact where width ×
        height × steps × rows is not: Heun and PNDM run more evaluations than steps, img2img
        fewer, and steps outside the guidance interval run half the rows."""
        return self.width * self.height * (self.unet_row_steps + self.control_row_steps)

    @property
    def guidance(self) -> bool:
        """Classifier-free guidance runs only when the scale is > 1 (diffusers' rule); then the
        request's prompts are encoded for both rows and the steps of its guidance interval run both."""
        return self.guidance_scale > 1.0

    @property
    def mode(self) -> str:
        """"txt2img", "img2img" or "inpaint" (outpainting is inpainting on a grown canvas)."""
        if self.mask_image is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "txt2img"

    @property
    def rows(self) -> int:
        """Most UNet rows this request occupies in a batch (steps outside its guidance interval
        run half of them)."""
        return self.num_images * (2 if self.guidance else 1)


def _resolve_stack(specs: tuple[AdapterSpec, ...]) -> tuple[StackEntry, ...]:
    if len(specs) > MAX_STACK:
        raise InvalidArgument(f"at most {MAX_STACK} adapters per request (got {len(specs)})", field="adapters")
    entries = []
    for index, spec in enumerate(specs):
        where = f"adapters[{index}]"
        # The engine reads files: the server maps registered names to its own files before this,
        # keeping the name as the label that errors and responses show.
        if not spec.path:
            raise InvalidArgument("names an adapter this engine cannot resolve; give a path", field=where)
        scale = 1.0 if spec.scale is None else float(spec.scale)
        start = 0.0 if spec.start is None else float(spec.start)
        end = 1.0 if spec.end is None else float(spec.end)
        if not math.isfinite(scale) or abs(scale) > MAX_ADAPTER_SCALE:
            raise InvalidArgument(f"must be between -{MAX_ADAPTER_SCALE:g} and {MAX_ADAPTER_SCALE:g}", field=f"{where}.scale")
        if not (0.0 <= start <= 1.0):
            raise InvalidArgument(f"must be between 0 and 1 (got {start})", field=f"{where}.start")
        if not (start <= end <= 1.0):
            raise InvalidArgument(f"must be between start ({start}) and 1 (got {end})", field=f"{where}.end")
        label = spec.name or os.path.basename(spec.path)
        entries.append(StackEntry(name=label, source=spec.path, scale=scale, start=start, end=end, digest=spec.sha256))
    return tuple(entries)


MAX_EMBEDDINGS = 8
MAX_HYPERNETWORKS = 4
# Data of the largest embedding a served model takes (75 vectors for a 768- and a 1280-wide
# encoder, float64) is 1.2 MB; a header claiming more is checked by the full load instead.
EMBEDDING_CHECK_BYTES = 4 << 20


@dataclass(frozen=True)
class StoredEmbedding:
    """What the store holds for an embedding file: its vectors, checked against one model's text
    encoders, and its header, from which each request's token is checked without the file."""

    embedding: Any  # TextualInversion, loaded under a neutral name and token
    header: tuple[HeaderEntry, ...]

    @property
    def nbytes(self) -> int:
        return self.embedding.nbytes


def embedding_token(header: tuple[HeaderEntry, ...], label: str, widths: Mapping[str, int], token: str | None) -> str:
    """The token a request's use of an embedding gives it, with `load_embedding`'s own checks
    (layout, dtypes, shapes, widths, vector count, token) run on what the header says: a
    zero-filled copy of the file. "" when the header claims too much data to copy (the full load
    at admission refuses that file, with load_embedding's message)."""
    from sdserve.adapters.embeddings import load_embedding

    zeros = zeros_file(header, EMBEDDING_CHECK_BYTES)
    if zeros is None:
        return ""
    return load_embedding(zeros, label, widths, token=token).token


def _resolve_embeddings(
    specs: tuple[EmbeddingSpec, ...], info: ModelInfo, weights: WeightStore | None
) -> tuple[EmbeddingEntry, ...]:
    """Check each embedding against the model's text encoders: from the store when it holds the
    file, else from the file's header alone (the data is read once, by the store, at admission)."""
    if len(specs) > MAX_EMBEDDINGS:
        raise InvalidArgument(f"at most {MAX_EMBEDDINGS} embeddings per request", field="embeddings")
    entries = []
    tokens: set[str] = set()
    for index, spec in enumerate(specs):
        if not spec.path:
            raise InvalidArgument("names an embedding this engine cannot resolve; give a path", field=f"embeddings[{index}]")
        label = spec.name or os.path.basename(spec.path)
        stored = None
        if weights is not None:
            digest = spec.sha256 or weights.digests.known(spec.path)
            stored = weights.peek(WeightKey("embedding", digest, info.name)) if digest else None
        header = stored.header if stored is not None else safetensors_header(spec.path, label)
        token = embedding_token(header, label, info.text_widths, spec.token or None)
        if token and token in tokens:
            raise InvalidArgument(f"token {token!r} is used twice", field=f"embeddings[{index}].token")
        tokens.add(token)
        entries.append(EmbeddingEntry(name=label, source=spec.path, token=token, digest=spec.sha256))
    return tuple(entries)


def _resolve_hypernetworks(specs: tuple[HypernetworkSpec, ...]) -> tuple[HypernetworkEntry, ...]:
    from sdserve.adapters.hypernetwork import PICKLE_PROBLEM, PICKLE_SUFFIXES

    if len(specs) > MAX_HYPERNETWORKS:
        raise InvalidArgument(f"at most {MAX_HYPERNETWORKS} hypernetworks per request", field="hypernetworks")
    entries = []
    for index, spec in enumerate(specs):
        where = f"hypernetworks[{index}]"
        if not spec.path:
            raise InvalidArgument("names a hypernetwork this engine cannot resolve; give a path", field=where)
        strength = 1.0 if spec.strength is None else float(spec.strength)
        if not (math.isfinite(strength) and -10.0 <= strength <= 10.0):
            raise InvalidArgument("must be between -10 and 10", field=f"{where}.strength")
        label = spec.name or os.path.basename(spec.path)
        if label.lower().endswith(PICKLE_SUFFIXES):  # load_hypernetwork's first check, by name alone
            raise AdapterError(label, PICKLE_PROBLEM)
        entries.append(HypernetworkEntry(name=label, source=spec.path, strength=strength, digest=spec.sha256))
    return tuple(entries)


def _resolve_images(spec: RequestSpec, info: ModelInfo) -> tuple[Any, Any, float]:
    """Decode and check image inputs -> (init image, mask, strength); header sizes are checked
    before any pixel is decoded."""
    limits = info.limits
    needs_mask = info.unet_in_channels == 9
    if spec.init_image is None:
        for name, value in (("mask", spec.mask), ("outpaint", spec.outpaint), ("strength", spec.strength)):
            if value is not None:
                raise InvalidArgument("needs an init_image", field=name)
        if needs_mask:
            raise InvalidArgument("this inpainting model needs init_image and mask (or outpaint)", field="init_image")
        return None, None, 1.0
    from sdserve.engine.images import decode_image, decode_mask, outpaint_canvas

    image = decode_image(spec.init_image, "init_image", max_pixels=limits.max_pixels)
    mask = None
    if spec.outpaint is not None:
        if spec.mask is not None:
            raise InvalidArgument("give either mask or outpaint, not both", field="outpaint")
        left, top, right, bottom = spec.outpaint
        if min(spec.outpaint) < 0 or max(spec.outpaint) > limits.max_side:
            raise InvalidArgument(f"margins must be between 0 and {limits.max_side}", field="outpaint")
        image, mask = outpaint_canvas(image, left, top, right, bottom, max_pixels=limits.max_pixels)
    elif spec.mask is not None:
        mask = decode_mask(spec.mask, "mask", image.size)
    elif needs_mask:
        raise InvalidArgument("this inpainting model needs a mask (or outpaint)", field="mask")
    default_strength = 1.0 if mask is not None else 0.8
    strength = default_strength if spec.strength is None else float(spec.strength)
    if not (0.0 < strength <= 1.0):
        raise InvalidArgument(f"must be in (0, 1] (got {strength})", field="strength")
    return image, mask, strength


def max_clip_skip(info: ModelInfo) -> int:
    """Deepest CLIP skip the model's text encoders allow: SD reads `hidden_states[-k]` (k up to
    the layer count), SDXL `hidden_states[-(k + 1)]` (one fewer); index -(layers + 1) is the
    token embeddings, not a layer. A compiled model's text encoder graph gives only its last two
    hidden states and no final layer norm (compile/onnx_graphs.py): 1 there."""
    if info.backend != "eager":
        return 1
    layers = min(info.text_layers.values(), default=1)
    return max(1, layers - (1 if info.family == "sdxl" else 0))


def _resolve_text(spec: RequestSpec, info: ModelInfo, default_syntax: str) -> tuple[str, int]:
    """(prompt syntax, clip skip) of a request: absent fields take the engine's syntax and 1."""
    from sdserve.engine.prompt_syntax import A1111, check_syntax, has_lora_tags

    syntax = check_syntax(spec.prompt_syntax if spec.prompt_syntax is not None else default_syntax)
    # The server moves <lora:> tags into the adapter stack before validation; left in an
    # A1111 prompt here, nobody could resolve their names.
    if syntax == A1111 and has_lora_tags(spec.prompt):
        raise InvalidArgument("<lora:NAME> tags are resolved by a server; in-process, give the adapter with --lora",
                              field="prompt")
    clip_skip = spec.clip_skip if spec.clip_skip is not None else 1
    _check_int("clip_skip", clip_skip, 1, max_clip_skip(info))
    return syntax, clip_skip


def _check_int(name: str, value: int, low: int, high: int) -> int:
    if not (low <= value <= high):
        raise InvalidArgument(f"must be between {low} and {high} (got {value})", field=name)
    return value


def resolve(
    spec: RequestSpec,
    info: ModelInfo,
    *,
    max_batch_rows: int,
    prompt_syntax: str = "plain",
    controlnet_store: ControlNetStore | None = None,
    ip_adapter_store: IPAdapterStore | None = None,
    weights: WeightStore | None = None,
    request_id: str = "",
    tenant: str = "",
    deadline: float | None = None,
) -> EngineRequest:
    """Validate `spec` against the model and fill absent fields from the model's defaults.

    Reads no weight file (`weights`, the engine's residency store, is only looked at), except the
    header of an embedding the store does not hold."""
    defaults, limits = info.defaults, info.limits
    if not spec.prompt or not spec.prompt.strip():
        raise InvalidArgument("must not be empty", field="prompt")
    if len(spec.prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"must be at most {MAX_PROMPT_CHARS} characters", field="prompt")
    if spec.negative_prompt is not None and len(spec.negative_prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"must be at most {MAX_PROMPT_CHARS} characters", field="negative_prompt")

    syntax, clip_skip = _resolve_text(spec, info, prompt_syntax)

    scheduler = spec.scheduler if spec.scheduler is not None else defaults.scheduler
    choice = resolve_scheduler(scheduler)

    steps = spec.steps if spec.steps is not None else defaults.steps
    max_steps = min(limits.max_steps, max_steps_for(choice, info.scheduler_config))
    if not (1 <= steps <= max_steps):
        rule = f"must be between 1 and {max_steps}"
        if max_steps < limits.max_steps:
            rule += f" for scheduler {scheduler}"
        raise InvalidArgument(f"{rule} (got {steps})", field="steps")
    try:
        # Some schedulers have rules of their own (PNDM's Runge-Kutta warm-up needs enough steps);
        # setting the timesteps here turns them into a validation error, and the scheduler goes
        # with the request (built once, on validation's thread rather than the engine loop's).
        scheduler_instance = make_scheduler(choice, info.scheduler_config)
        scheduler_instance.set_timesteps(steps)
    except (ValueError, IndexError) as exc:
        raise InvalidArgument(f"scheduler {scheduler} cannot take {steps} steps", field="steps") from exc

    guidance = spec.guidance_scale if spec.guidance_scale is not None else defaults.guidance_scale
    if not (0.0 <= guidance <= MAX_GUIDANCE):  # also refuses NaN
        raise InvalidArgument(f"must be between 0 and {MAX_GUIDANCE:g} (got {guidance})", field="guidance_scale")
    guidance_start = spec.guidance_start if spec.guidance_start is not None else defaults.guidance_start
    guidance_end = spec.guidance_end if spec.guidance_end is not None else defaults.guidance_end
    if not (0.0 <= guidance_start <= 1.0):
        raise InvalidArgument(f"must be between 0 and 1 (got {guidance_start})", field="guidance_start")
    if not (guidance_start <= guidance_end <= 1.0):
        raise InvalidArgument(
            f"must be between guidance_start ({guidance_start:g}) and 1 (got {guidance_end})", field="guidance_end"
        )

    init_image, mask_image, strength = _resolve_images(spec, info)
    if init_image is not None:
        for name, given, actual in (("width", spec.width, init_image.width), ("height", spec.height, init_image.height)):
            if given is not None and given != actual:
                what = "the outpainted canvas" if spec.outpaint else "init_image"
                raise InvalidArgument(f"is {given} but {what} is {actual} pixels", field=name)
    width = init_image.width if init_image is not None else spec.width if spec.width is not None else defaults.width
    height = init_image.height if init_image is not None else spec.height if spec.height is not None else defaults.height
    for name, side in (("width", width), ("height", height)):
        if side % 8 != 0:
            raise InvalidArgument(f"must be a multiple of 8 (got {side})", field=name)
        _check_int(name, side, limits.min_side, limits.max_side)
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"width × height must be at most {limits.max_pixels} pixels (got {width * height})", field="width"
        )

    num_images = spec.num_images if spec.num_images is not None else 1
    _check_int("num_images", num_images, 1, limits.max_num_images)
    rows = num_images * (2 if guidance > 1.0 else 1)
    if rows > max_batch_rows:
        raise InvalidArgument(
            f"needs {rows} UNet rows, more than the engine's batch of {max_batch_rows}; ask for fewer images",
            field="num_images",
        )

    seed = spec.seed if spec.seed is not None else random.SystemRandom().randrange(2**32)
    _check_int("seed", seed, 0, MAX_SEED)
    adapters = _resolve_stack(spec.adapters)
    controlnets: tuple[ControlUnit, ...] = ()
    if spec.controlnets:
        if controlnet_store is None:
            raise InvalidArgument("ControlNet units are not served here", field="controlnets")
        controlnets = resolve_units(spec.controlnets, info, controlnet_store)
    embeddings = _resolve_embeddings(spec.embeddings, info, weights)
    hypernetworks = _resolve_hypernetworks(spec.hypernetworks)
    ip_adapters: tuple[IPAdapterUnit, ...] = ()
    if spec.ip_adapters:
        if ip_adapter_store is None:
            raise InvalidArgument("IP-Adapters are not served here", field="ip_adapters")
        ip_adapters = resolve_ip_units(spec.ip_adapters, info, ip_adapter_store)
    if init_image is not None and int(steps * strength) < 1:
        raise InvalidArgument(
            f"steps × strength must be at least 1 (got {steps} × {strength:g})", field="strength"
        )
    unet_steps, unet_row_steps, control_row_steps = _evaluations(
        scheduler_instance, steps, strength if init_image is not None else 1.0, num_images, guidance > 1.0,
        (guidance_start, guidance_end), controlnets,
    )

    return EngineRequest(
        model=info.name,
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        seed=seed,
        steps=steps,
        guidance_scale=float(guidance),
        scheduler=scheduler,
        width=width,
        height=height,
        num_images=num_images,
        adapters=adapters,
        init_image=init_image,
        mask_image=mask_image,
        strength=strength,
        outpaint=spec.outpaint,
        controlnets=controlnets,
        ip_adapters=ip_adapters,
        embedding_refs=embeddings,
        hypernetwork_refs=hypernetworks,
        preview_every=_check_int("preview_every", spec.preview_every or 0, 0, steps),
        guidance_start=float(guidance_start),
        guidance_end=float(guidance_end),
        clip_skip=clip_skip,
        prompt_syntax=syntax,
        request_id=request_id,
        tenant=tenant,
        deadline=deadline,
        unet_steps=unet_steps,
        unet_row_steps=unet_row_steps,
        control_row_steps=control_row_steps,
        prepared_scheduler=PreparedScheduler(scheduler_instance),
    )


def _evaluations(
    scheduler: Any, steps: int, strength: float, num_images: int, guidance: bool,
    interval: tuple[float, float], controlnets: tuple[ControlUnit, ...],
) -> tuple[int, int, int]:
    """(UNet evaluations, Σ rows over them, Σ rows the ControlNet units run) of the schedule the
    request will run: the timesteps `init_latents.strength_timesteps` keeps, one or two rows per
    image at each (the guidance interval's activity rule), each unit on its active evaluations."""
    kept = min(int(steps * strength), steps)
    evaluations = len(scheduler.timesteps[max(steps - kept, 0) * scheduler.order :])
    rows = [num_images * (2 if guidance and active_at(i, evaluations, *interval) else 1) for i in range(evaluations)]
    control = sum(rows[i] for unit in controlnets for i in range(evaluations)
                  if active_at(i, evaluations, unit.start, unit.end))
    return evaluations, sum(rows), control

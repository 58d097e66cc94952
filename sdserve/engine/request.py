"""The engine's request types: `RequestSpec` (what a caller asked, absent fields None) and
`EngineRequest` (the validated domain form of the proto's GenerateRequest, defaults resolved).

`resolve` is the one place requests are validated; every rule failure is an `InvalidArgument`
that names the field and the rule.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field, fields
from typing import Any

from sdserve.engine.controlnet import ControlNetStore, ControlSpec, ControlUnit, resolve_units
from sdserve.engine.ip_adapter import IPAdapterSpec, IPAdapterStore, IPAdapterUnit, resolve_ip_units
from sdserve.engine.model import ModelInfo
from sdserve.engine.schedulers import make_scheduler, max_steps_for, resolve_scheduler
from sdserve.errors import InvalidArgument

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 4096
MAX_GUIDANCE = 100.0
MAX_ADAPTER_SCALE = 100.0


MAX_STACK = 8  # adapters in one request's stack


@dataclass(frozen=True)
class AdapterSpec:
    """One entry of a request's adapter stack: the proto's AdapterRef (None = absent).

    The engine needs `path`; `name`, when given, is only the label errors and responses use.
    `sha256`, when given (the server's registry knows it), is the file's identity: the engine
    trusts it instead of hashing the file again."""

    name: str = ""
    path: str = ""
    scale: float | None = None
    start: float | None = None
    end: float | None = None
    sha256: str = ""


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
class EmbeddingSpec:
    """A textual-inversion embedding as given (the engine reads `path`; `name` labels it)."""

    name: str = ""
    path: str = ""
    token: str = ""


@dataclass(frozen=True)
class HypernetworkSpec:
    name: str = ""
    path: str = ""
    strength: float | None = None


@dataclass(frozen=True)
class RequestSpec:
    """A request as given, field for field the proto's GenerateRequest; None = absent."""

    model: str = ""
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    num_images: int | None = None
    adapters: tuple[AdapterSpec, ...] = ()
    init_image: bytes | None = None  # PNG/JPEG bytes
    strength: float | None = None
    mask: bytes | None = None  # PNG/JPEG bytes
    outpaint: tuple[int, int, int, int] | None = None  # left, top, right, bottom
    controlnets: tuple[ControlSpec, ...] = ()
    ip_adapters: tuple[IPAdapterSpec, ...] = ()
    embeddings: tuple[EmbeddingSpec, ...] = ()
    hypernetworks: tuple[HypernetworkSpec, ...] = ()
    preview_every: int | None = None
    guidance_start: float | None = None
    guidance_end: float | None = None


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
    embeddings: tuple[Any, ...] = field(default=(), compare=False, repr=False)  # TextualInversion
    hypernetworks: tuple[tuple[Any, float], ...] = field(default=(), compare=False, repr=False)  # (net, strength)
    preview_every: int = 0  # a latent preview with every N-th step event (0: none)
    guidance_start: float = 0.0  # guidance interval, fractions of the schedule (activity rule)
    guidance_end: float = 1.0
    request_id: str = ""
    tenant: str = ""
    deadline: float | None = field(default=None, compare=False)  # time.monotonic() seconds

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


def spec_field_names() -> list[str]:
    return [f.name for f in fields(RequestSpec)]


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


def _load_embeddings(specs: tuple[EmbeddingSpec, ...], info: ModelInfo) -> tuple[Any, ...]:
    """Read each embedding file and check it against the model's text encoders."""
    from sdserve.adapters.embeddings import load_embedding

    if len(specs) > MAX_EMBEDDINGS:
        raise InvalidArgument(f"at most {MAX_EMBEDDINGS} embeddings per request", field="embeddings")
    loaded = []
    tokens: set[str] = set()
    for index, spec in enumerate(specs):
        if not spec.path:
            raise InvalidArgument("names an embedding this engine cannot resolve; give a path", field=f"embeddings[{index}]")
        label = spec.name or os.path.basename(spec.path)
        embedding = load_embedding(spec.path, label, info.text_widths, token=spec.token or None)
        if embedding.token in tokens:
            raise InvalidArgument(f"token {embedding.token!r} is used twice", field=f"embeddings[{index}].token")
        tokens.add(embedding.token)
        loaded.append(embedding)
    return tuple(loaded)


def _load_hypernetworks(specs: tuple[HypernetworkSpec, ...], info: ModelInfo) -> tuple[tuple[Any, float], ...]:
    from sdserve.adapters.hypernetwork import load_hypernetwork

    if len(specs) > MAX_HYPERNETWORKS:
        raise InvalidArgument(f"at most {MAX_HYPERNETWORKS} hypernetworks per request", field="hypernetworks")
    loaded = []
    for index, spec in enumerate(specs):
        where = f"hypernetworks[{index}]"
        if not spec.path:
            raise InvalidArgument("names a hypernetwork this engine cannot resolve; give a path", field=where)
        strength = 1.0 if spec.strength is None else float(spec.strength)
        if not (math.isfinite(strength) and -10.0 <= strength <= 10.0):
            raise InvalidArgument("must be between -10 and 10", field=f"{where}.strength")
        label = spec.name or os.path.basename(spec.path)
        loaded.append((load_hypernetwork(spec.path, label, info.attention_widths), strength))
    return tuple(loaded)


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


def _check_int(name: str, value: int, low: int, high: int) -> int:
    if not (low <= value <= high):
        raise InvalidArgument(f"must be between {low} and {high} (got {value})", field=name)
    return value


def resolve(
    spec: RequestSpec,
    info: ModelInfo,
    *,
    max_batch_rows: int,
    controlnet_store: ControlNetStore | None = None,
    ip_adapter_store: IPAdapterStore | None = None,
    request_id: str = "",
    tenant: str = "",
    deadline: float | None = None,
) -> EngineRequest:
    """Validate `spec` against the model and fill absent fields from the model's defaults."""
    defaults, limits = info.defaults, info.limits
    if not spec.prompt or not spec.prompt.strip():
        raise InvalidArgument("must not be empty", field="prompt")
    if len(spec.prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"must be at most {MAX_PROMPT_CHARS} characters", field="prompt")
    if spec.negative_prompt is not None and len(spec.negative_prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"must be at most {MAX_PROMPT_CHARS} characters", field="negative_prompt")

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
        # setting the timesteps once here is cheap and turns them into a validation error.
        make_scheduler(choice, info.scheduler_config).set_timesteps(steps)
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
    embeddings = _load_embeddings(spec.embeddings, info)
    hypernetworks = _load_hypernetworks(spec.hypernetworks, info)
    ip_adapters: tuple[IPAdapterUnit, ...] = ()
    if spec.ip_adapters:
        if ip_adapter_store is None:
            raise InvalidArgument("IP-Adapters are not served here", field="ip_adapters")
        ip_adapters = resolve_ip_units(spec.ip_adapters, info, ip_adapter_store)
    if init_image is not None and int(steps * strength) < 1:
        raise InvalidArgument(
            f"steps × strength must be at least 1 (got {steps} × {strength:g})", field="strength"
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
        embeddings=embeddings,
        hypernetworks=hypernetworks,
        preview_every=_check_int("preview_every", spec.preview_every or 0, 0, steps),
        guidance_start=float(guidance_start),
        guidance_end=float(guidance_end),
        request_id=request_id,
        tenant=tenant,
        deadline=deadline,
    )

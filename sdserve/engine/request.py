"""The engine's request types: `RequestSpec` (what a caller asked, absent fields None) and
`EngineRequest` (the validated domain form of the proto's GenerateRequest, defaults resolved).

`resolve` is the one place requests are validated; every rule failure is an `InvalidArgument`
that names the field and the rule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

from sdserve.engine.model import ModelInfo
from sdserve.engine.schedulers import make_scheduler, max_steps_for, resolve_scheduler
from sdserve.errors import InvalidArgument

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 4096
MAX_GUIDANCE = 100.0


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
    request_id: str = ""
    tenant: str = ""
    deadline: float | None = field(default=None, compare=False)  # time.monotonic() seconds

    @property
    def guidance(self) -> bool:
        """Classifier-free guidance runs only when the scale is > 1 (diffusers' rule)."""
        return self.guidance_scale > 1.0

    @property
    def rows(self) -> int:
        """UNet rows this request occupies in a batch."""
        return self.num_images * (2 if self.guidance else 1)


def spec_field_names() -> list[str]:
    return [f.name for f in fields(RequestSpec)]


def _check_int(name: str, value: int, low: int, high: int) -> int:
    if not (low <= value <= high):
        raise InvalidArgument(f"must be between {low} and {high} (got {value})", field=name)
    return value


def resolve(
    spec: RequestSpec,
    info: ModelInfo,
    *,
    max_batch_rows: int,
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

    width = spec.width if spec.width is not None else defaults.width
    height = spec.height if spec.height is not None else defaults.height
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
        request_id=request_id,
        tenant=tenant,
        deadline=deadline,
    )

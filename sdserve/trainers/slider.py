"""Text Concept Sliders (Gandikota et al. 2023): a LoRA whose scale moves one attribute.

No images: the targets are the frozen model's own predictions. For a latent x_t of the target
prompt, with ε* the frozen model (no LoRA) and ε_s the model with the LoRA at scale s,

    ε_{+1}(x_t, target) -> ε*(x_t, target) + η·(ε*(x_t, target+positive) - ε*(x_t, target+negative))
    ε_{-1}(x_t, target) -> ε*(x_t, target) - η·(ε*(x_t, target+positive) - ε*(x_t, target+negative))
    ε_{±1}(x_t, anchor) -> ε*(x_t, anchor)              (anchors: prompts the slider must leave alone)

and the loss is ½(L₊ + L₋) + anchor_weight·½(A₊ + A₋), each term a mean squared error. At step 0
(B = 0) the LoRA predicts ε* itself, so the loss is η²·mean((ε*(pos) - ε*(neg))²).

The model's output stands in for ε: for an ε model it is ε; for a v-prediction model (the
embedded default model) v = ε/√ᾱ - (√(1-ᾱ)/√ᾱ)·x_t at a fixed x_t and t, an affine function of
ε, so the same targets written in v are the ε targets, each step's error weighted by 1/ᾱ_t.

Where x_t comes from. The paper partially denoises pure noise with the model under the target
prompt down to a random step, every step. Here the frozen model generates a pool of samples of
the target prompt(s) once, through sdserve's own engine (the sampler and guidance the model
serves with), and each step noises one of them to a random t with q(x_t | x_0): the same
marginal for a model that samples its own distribution, at pool_size·pool_steps UNet calls in
all instead of up to pool_steps per training step. The pool is a function of (model, prompts,
seed, pool size, steps), regenerated identically on --resume.

Prompts are combined as the paper's are: the attribute word goes after the target's article
("a red circle" + "large" -> "a large red circle", the shapes world's word order), or before a
target without one.

The file is a LoRA (`lora.LoRAMethod` writes it, diffusers/PEFT or kohya keys) flagged as a
slider (`sdserve_slider: true`, which `adapters.is_slider` reads), with the scale range it was
trained on and a suggested start fraction of the denoising steps in its metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdserve.errors import InvalidArgument
from sdserve.trainers.components import Components, Conditioning
from sdserve.trainers.lora import LoRAConfig, LoRAMethod, check_config

SCALE_RANGE = (-1.0, 1.0)  # the scales the objective trains; served scales beyond extrapolate
_POOL_SEED_STREAM = 31  # SeedSequence stream of the pool's generation seeds
_ARTICLES = ("a ", "an ", "the ")


@dataclass(frozen=True)
class SliderConfig:
    """The slider's prompts and objective; the `sdserve train slider` flags mirror these fields."""

    positive: str
    """Attribute word(s) the LoRA moves toward at scale +1, e.g. "large"."""
    negative: str
    """Attribute word(s) it moves toward at scale -1, e.g. "small"."""
    targets: tuple[str, ...] = ()
    """Prompts whose samples the slider edits ("" : the unconditional prompt); one per pool sample, in turn."""
    anchors: tuple[str, ...] = ()
    """Prompts whose prediction the LoRA must keep (the paper's preservation prompts)."""
    eta: float = 1.0
    """Guidance strength η of the edit direction ε*(pos) - ε*(neg)."""
    anchor_weight: float = 1.0
    """Weight of the anchors' loss against the edit's."""
    start: float = 0.0
    """Suggested fraction of the denoising steps after which to apply it (metadata only)."""
    pool_size: int = 16
    """Samples of the target prompt(s) the frozen model generates once, noised anew each step."""
    pool_steps: int = 20
    """Sampler steps of each pool sample."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)


def combine(target: str, words: str) -> str:
    """The target prompt with the attribute words put in: after its article, else in front."""
    target, words = target.strip(), words.strip()
    if not target:
        return words
    for article in _ARTICLES:
        if target.lower().startswith(article):
            return target[: len(article)] + words + " " + target[len(article):]
    return f"{words} {target}"


def check_slider_config(config: SliderConfig) -> None:
    """One-line errors naming the flag, before any model is loaded."""
    check_config(config.lora)
    if config.lora.text_encoder:
        raise InvalidArgument("sliders train the UNet only (the frozen predictions share one text encoding)",
                              field="--text-encoder")
    if not config.positive.strip():
        raise InvalidArgument("must name the attribute, e.g. \"large\"", field="--positive")
    if not config.negative.strip():
        raise InvalidArgument("must name the opposite attribute, e.g. \"small\"", field="--negative")
    if config.positive.strip() == config.negative.strip():
        raise InvalidArgument(f"equals --negative ({config.positive.strip()!r}): the slider would learn no "
                              "direction", field="--positive")
    checks = [
        (np.isfinite(config.eta) and config.eta > 0, "--eta", f"must be a positive number (got {config.eta})"),
        (np.isfinite(config.anchor_weight) and config.anchor_weight >= 0, "--anchor-weight",
         f"must be a number >= 0 (got {config.anchor_weight})"),
        (0.0 <= config.start < 1.0, "--start", f"must be in [0, 1) (got {config.start})"),
        (config.pool_size >= 1, "--pool-size", f"must be >= 1 (got {config.pool_size})"),
        (config.pool_steps >= 1, "--pool-steps", f"must be >= 1 (got {config.pool_steps})"),
        (len(config.targets) >= 1 and all(t.strip() for t in config.targets), "--target",
         "needs at least one non-empty prompt, e.g. \"a red circle\" (the frozen model draws its samples from it)"),
    ]
    for ok, flag, problem in checks:
        if not ok:
            raise InvalidArgument(problem, field=flag)


def pool_seed(seed: int, index: int) -> int:
    """The engine seed of pool sample `index`: fixed by (seed, index) alone."""
    return int(np.random.SeedSequence([seed, _POOL_SEED_STREAM, index]).generate_state(1, np.uint32)[0])


def _rows(conditioning: Conditioning, rows: Sequence[int]) -> Conditioning:
    """The conditioning of some prompts, repeated or reordered by row index."""
    index = torch.tensor(list(rows))
    added = None if conditioning.added is None else {k: v[index] for k, v in conditioning.added.items()}
    return Conditioning(conditioning.states[index], added)


class SliderLoRA:
    """What every slider shares, text or visual (slider_pairs.py): a `LoRAMethod` on the UNet whose
    scale a step switches between 0 (the frozen model), +1 and -1 (per batch row), written as a
    LoRA flagged as a slider with its trained scale range and suggested start."""

    kind = "slider"

    def __init__(self, components: Components, lora: LoRAConfig, start: float, seed: int = 0) -> None:
        self.components, self.seed, self.start = components, seed, start
        self.lora = LoRAMethod(components, lora, seed=seed)

    def parameters(self) -> list[nn.Parameter]:
        return self.lora.parameters()

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        return self.lora.predict(noisy, timesteps, captions)  # [B, C, h, w], the LoRA at its trained scale

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.lora.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.lora.load_state_dict(state)

    def slider_metadata(self, objective: str, scale_range: tuple[float, float] = SCALE_RANGE) -> dict[str, str]:
        """The keys every slider file has (ListAdapters shows the scale range and start)."""
        return self.lora.metadata() | {
            "sdserve_slider_scale_range": ",".join(f"{s:g}" for s in scale_range),
            "sdserve_slider_start": f"{self.start:g}",
            "sdserve_slider_objective": objective,
        }

    def write(self, out: Path, metadata: dict[str, str]) -> None:
        self.lora.write(out, metadata | {"sdserve_slider": "true"})

    def set_scale(self, multiplier: float | torch.Tensor) -> None:
        """Every LoRA layer at `multiplier` times its trained scale (0: the frozen model), or per
        batch row with a tensor [B] of multipliers: the UNet's adapted modules all see batch-first
        inputs ([B, T, in] linears, [B, in, H, W] convs), so one call serves +1 and -1 rows."""
        scale = self.lora.config.scale
        for layer in self.lora.layers.values():
            if isinstance(multiplier, torch.Tensor):
                shape = (-1, 1, 1) if layer.spec.kind == "linear" else (-1, 1, 1, 1)
                layer.scale = (multiplier * scale).view(shape)  # [B, 1, 1] or [B, 1, 1, 1]
            else:
                layer.scale = multiplier * scale


class SliderMethod(SliderLoRA):
    """The text slider for `loop.train(data=None)`."""

    def __init__(self, components: Components, config: SliderConfig, seed: int = 0, device: str = "cpu",
                 progress: bool = False) -> None:
        check_slider_config(config)
        super().__init__(components, config.lora, config.start, seed=seed)
        self.config = config
        self.device, self.progress = device, progress
        self._pool: torch.Tensor | None = None  # [pool_size, C, h, w], built on the first step
        # Prompt rows: targets, then each target's positive and negative, then anchors.
        targets = list(config.targets)
        self.prompts = [*targets, *(combine(t, config.positive) for t in targets),
                        *(combine(t, config.negative) for t in targets), *config.anchors]
        with torch.no_grad():  # the text encoders are frozen: one encoding serves every step
            self.conditioning = components.encode_text(self.prompts)

    def metadata(self) -> dict[str, str]:
        c = self.config
        return self.slider_metadata("text") | {
            "sdserve_slider_positive": c.positive.strip(),
            "sdserve_slider_negative": c.negative.strip(),
            "sdserve_slider_targets": "|".join(c.targets),
            "sdserve_slider_anchors": "|".join(c.anchors),
            "sdserve_slider_eta": f"{c.eta:g}",
            "sdserve_slider_anchor_weight": f"{c.anchor_weight:g}",
            "sdserve_slider_pool": f"{c.pool_size}x{c.pool_steps}",
        }

    # -- the objective -----------------------------------------------------------------------

    def pool(self) -> torch.Tensor:
        """Latents [pool_size, C, h, w] of images the frozen model drew for the target prompts
        (sample i from target i mod len(targets)), generated by sdserve's engine, then encoded."""
        if self._pool is None:
            self._pool = self._generate_pool()
        return self._pool

    def _generate_pool(self) -> torch.Tensor:
        from tqdm import tqdm

        from sdserve.engine import Engine, EngineConfig, RequestSpec

        c, side = self.config, self.components.resolution
        engine = Engine(EngineConfig(device=self.device))
        specs = [engine.validate(RequestSpec(model=str(self.components.path), prompt=c.targets[i % len(c.targets)],
                                             seed=pool_seed(self.seed, i), steps=c.pool_steps, width=side,
                                             height=side, num_images=1))
                 for i in range(c.pool_size)]
        images = []
        with tqdm(total=len(specs), desc="slider pool", unit="image", disable=not self.progress,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(specs), 8):
                for outcome in engine.generate(specs[start : start + 8]):
                    if isinstance(outcome, Exception):
                        raise outcome
                    images.append(torch.from_numpy(np.ascontiguousarray(outcome.images[0])))  # [H, W, 3] uint8
                    bar.update(1)
        pixels = torch.stack(images).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W] uint8
        return self.components.encode_images(pixels)  # [N, C, h, w]

    def targets_at(self, noisy: torch.Tensor, timestep: torch.Tensor, target: int) -> tuple[torch.Tensor, ...]:
        """The frozen model's outputs [1 + A, C, h, w] for target `target` and the anchors at
        x_t `noisy` [1, C, h, w], and the edit direction ε*(pos) - ε*(neg) [1, C, h, w]."""
        count = len(self.config.targets)
        rows = [target, count + target, 2 * count + target, *range(3 * count, len(self.prompts))]
        self.set_scale(0.0)
        with torch.no_grad():
            frozen = self.components.predict(noisy.expand(len(rows), -1, -1, -1), timestep.expand(len(rows)),
                                             _rows(self.conditioning, rows))  # [3 + A, C, h, w]
        kept = torch.cat([frozen[:1], frozen[3:]])  # [1 + A, C, h, w]: target, anchors
        return kept, frozen[1:2] - frozen[2:3]

    def step_loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        """The loss of step `step`: a pool sample, a timestep and noise drawn from `generator`."""
        pool, objective, c = self.pool(), self.components.objective, self.config
        index = int(torch.randint(0, len(pool), (1,), generator=generator))
        timestep = torch.randint(0, objective.num_timesteps, (1,), generator=generator)  # [1]
        noise = torch.randn(pool[index : index + 1].shape, generator=generator)  # [1, C, h, w]
        noisy = objective.add_noise(pool[index : index + 1], noise, timestep)  # [1, C, h, w]
        target = index % len(c.targets)
        kept, direction = self.targets_at(noisy, timestep, target)
        rows = [target, *range(3 * len(c.targets), len(self.prompts))]  # target, anchors
        # One call for both signs: rows [+1: target, anchors, -1: target, anchors].
        signs = torch.tensor([1.0, -1.0]).repeat_interleave(len(rows))  # [2(1 + A)]
        self.set_scale(signs)
        prediction = self.components.predict(noisy.expand(len(signs), -1, -1, -1), timestep.expand(len(signs)),
                                             _rows(self.conditioning, rows * 2))  # [2(1 + A), C, h, w]
        plus, minus = prediction[: len(rows)], prediction[len(rows) :]  # [1 + A, C, h, w] each
        edits = [F.mse_loss(plus[:1], kept[:1] + c.eta * direction),
                 F.mse_loss(minus[:1], kept[:1] - c.eta * direction)]
        anchors = [F.mse_loss(plus[1:], kept[1:]), F.mse_loss(minus[1:], kept[1:])] if len(rows) > 1 else []
        self.set_scale(1.0)  # the trained scale: what `predict` and the written file mean
        loss = (edits[0] + edits[1]) / 2
        if anchors:
            loss = loss + c.anchor_weight * (anchors[0] + anchors[1]) / 2
        return loss

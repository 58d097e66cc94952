"""The one training loop every adapter method shares (LoRA, textual inversion, hypernetwork, ...).

The loop owns everything that is not the method: latents, batches, noise, timesteps and the
target (from the base model's prediction_type), the loss and its prior-preservation term, AdamW,
gradient clipping, progress, checkpoints, resume, signals, divergence and the atomic output.
A method (the `Method` protocol) owns which parameters train, how the model predicts with them
(text encoding included, so new token rows or context MLPs hook in there), its trainable state
and its output file.

Writing a method: wrap or extend `Components` (a frozen base model), return the new parameters
from `parameters()`, and in `predict` call the base model's pieces with your changes:

    def predict(self, noisy, timesteps, captions):
        conditioning = self.components.encode_text(captions)         # or your own encoding
        return self.components.predict(noisy, timesteps, conditioning)

A method may also define `check_data(data: CaptionedImages) -> None`, which `train` calls on the
--data images before anything runs, to refuse with one line what it cannot learn from (a textual
inversion whose captions lack its token). It is optional, so it is not part of `Method`.

A method that reads more of each image than its latents and caption (a ControlNet reads its
conditioning image) may define `use_rows(rows: list[int]) -> None`: the loop calls it before each
step's `predict` with the --data indices of that step's images, in batch order. It is optional too.

A method that learns from no images (the Concept Slider: its targets are the frozen model's own
predictions) defines `step_loss(step: int, generator: torch.Generator) -> torch.Tensor` and is
trained with `data=None`: the loop then calls it for each step's loss instead of drawing a batch,
with the step's seeded generator (seed, noise stream, step), so determinism and resume hold as for
every other method. The loop's own path is unchanged when `data` is given.

Determinism. Everything random in a step is drawn from generators keyed by (seed, step): the
images of step s are positions [s·B, (s+1)·B) of a stream of seeded per-epoch permutations, and
timesteps and noise come from a torch generator seeded by (seed, s). Nothing depends on
earlier steps' draws or on the clock, so a run resumed from step k's checkpoint (trainable
state, optimizer state, step) continues exactly as the uninterrupted run would, and the same
seed gives the same output bytes (on the same machine and thread count).

Latents are the VAE posterior's mean, encoded once. SD's VAEs have posterior std ~1e-3 of the
latents' spread, so a sample differs from the mean by far less than the noise added at any t
the loop trains on; the mean keeps the latents a function of the images alone (no RNG to key,
store or replay), which is what lets the cache be rebuilt identically on resume.

Prior preservation (--reg-data, kohya's regularization images, DreamBooth's class images): every
step draws `batch_size` images from each set; the loss is
mean(instance losses) + prior_loss_weight · mean(regularization losses), as diffusers'
DreamBooth scripts compute it.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sdserve import __version__
from sdserve.errors import InvalidArgument
from sdserve.trainers.components import Components, Conditioning, load_components
from sdserve.trainers.data import CaptionedImages
from sdserve.trainers.output import (
    atomic_write,
    check_directory_writable,
    check_writable,
    load_checkpoint,
    save_checkpoint,
)
from sdserve.trainers.threads import keeps_torch_threads

__all__ = [
    "CHECKPOINT_FILE",
    "Components",
    "Conditioning",
    "Diverged",
    "Interrupted",
    "LoopConfig",
    "Method",
    "Result",
    "check_loop_config",
    "TrainingStopped",
    "default_state_dir",
    "load_components",
    "restore_state",
    "seeded_generator",
    "train",
]

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# Keys of the seeded streams (the second word of every generator's seed), one per kind of draw.
_STREAM_IMAGES, _STREAM_REG_IMAGES, _STREAM_NOISE = 11, 12, 13
METADATA_PREFIX = "sdserve_"


@runtime_checkable
class Method(Protocol):
    """What a training method provides to `train`."""

    kind: str
    """Short name written to the output's metadata and checked on resume: "lora", "textual_inversion"."""

    def parameters(self) -> list[nn.Parameter]:
        """The tensors AdamW updates, in a fixed order (the optimizer state is saved by position)."""
        ...

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """The model's output [B, C, h, w] for noisy latents [B, C, h, w], timesteps [B] int64 and
        B captions, with the method's trainable pieces in place (text encoding included)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable state, as checkpoints hold it."""
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict()`'s output (on resume); raise on a mismatch of names or shapes."""
        ...

    def metadata(self) -> dict[str, str]:
        """Method-specific provenance (rank, alpha, targets, trigger tokens), "sdserve_" keys:
        written into the output and compared with a checkpoint's on resume (a mismatch is refused)."""
        ...

    def write(self, out: Path, metadata: dict[str, str]) -> None:
        """Write the final adapter to `out` (a temporary path: the loop makes it atomic), with
        `metadata` in its safetensors header; `output.safetensors_bytes` gives the same bytes
        for the same contents (safetensors' own writer orders the metadata at random)."""
        ...


@dataclass(frozen=True)
class LoopConfig:
    """Everything the loop's behaviour depends on; the `sdserve train` flags mirror these fields."""

    steps: int = 500
    """Total optimizer steps; a resumed run continues up to this count."""
    lr: float = 1e-4
    """AdamW learning rate: the whole run's with lr_schedule "constant", the first step's with "cosine"."""
    lr_schedule: str = "constant"
    """"constant", or "cosine": lr * (1 + cos(pi * step / steps)) / 2, decaying to 0 at the last step.
    A function of the step alone, so a resumed run follows the same curve (for the same --steps)."""
    batch_size: int = 1
    """Images per step (and as many regularization images again with reg data)."""
    seed: int = 0
    """Seeds the image order, timesteps and noise of every step (and a method's initial values)."""
    save_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end and when stopped)."""
    threads: int = 1
    """torch intra-op threads; part of what makes a rerun give the same bytes."""
    progress: bool = True
    """Show a progress bar (loss, it/s, ETA) on stderr."""
    resume: Path | None = None
    """A state directory (checkpoint.pt) to continue from."""
    state_dir: Path | None = None
    """Where checkpoints go (default: next to the output, see default_state_dir)."""
    prior_loss_weight: float = 1.0
    """Weight of the regularization images' loss relative to the instance images'."""
    resolution: int | None = None
    """Pixel side the data was loaded at (None: the model's native side); checked against the data."""
    weight_decay: float = 1e-2
    """AdamW weight decay (torch's and kohya's default)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    min_snr_gamma: float | None = None
    """Min-SNR-γ loss weighting (None: plain MSE, as diffusers' and kohya's LoRA scripts default)."""


@dataclass(frozen=True)
class Result:
    out: Path
    steps: int  # the step count reached (the checkpoint's step)
    losses: tuple[float, ...]  # one per step run by this call
    state_dir: Path
    metadata: dict[str, str] = field(repr=False)


class TrainingStopped(Exception):
    """A run ended before writing its output; `checkpoint` is the state it can resume from."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class Diverged(TrainingStopped):
    """The loss or the gradient became NaN/inf; the last good checkpoint is kept."""


class Interrupted(TrainingStopped):
    """SIGINT/SIGTERM arrived; the state at the step boundary after it was saved."""

    def __init__(self, message: str, step: int, checkpoint: Path | None, signum: int) -> None:
        super().__init__(message, step, checkpoint)
        self.signum = signum


def restore_state(current: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy a checkpoint's `state` into a method's live tensors `current` (its `state_dict()`,
    whose tensors are the trainable ones), in place: every method's `load_state_dict`.
    ValueError naming the first difference of names (`what` says what they are) or shapes."""
    if set(state) != set(current):
        differing = sorted(set(current) ^ set(state))
        raise ValueError(f"{what} differ: {differing[0]} and {len(differing) - 1} more")
    with torch.no_grad():
        for key, tensor in current.items():
            if state[key].shape != tensor.shape:
                raise ValueError(f"{key} has shape {list(state[key].shape)}, expected {list(tensor.shape)}")
            tensor.copy_(state[key])


def default_state_dir(out: Path) -> Path:
    """`lora.safetensors` -> `lora.state/` beside it."""
    return out.with_name(out.stem + ".state")


def seeded_generator(seed: int, stream: int, step: int = 0) -> torch.Generator:
    """A torch generator keyed by (seed, stream, step): methods use it for their initial values
    with a stream number of their own (the loop uses 11-13)."""
    words = np.random.SeedSequence([seed, stream, step]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 31 ^ int(words[1]))


def batch_indices(seed: int, stream: int, step: int, batch_size: int, count: int) -> list[int]:
    """Indices of step `step`'s images: positions [step·B, (step+1)·B) of the concatenation of
    per-epoch permutations of range(count), epoch e's drawn from rng(seed, stream, e). Every image
    is seen once per epoch, and any step's batch is computed without replaying earlier ones."""
    indices, permutations = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        if epoch not in permutations:
            permutations[epoch] = np.random.default_rng([seed, stream, epoch]).permutation(count)
        indices.append(int(permutations[epoch][offset]))
    return indices


class _StopSignals:
    """SIGINT/SIGTERM set a flag the loop reads at each step boundary; a second one raises
    KeyboardInterrupt at once. Main thread only: Python delivers signals there; elsewhere the
    loop runs without handlers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # a second Ctrl-C: stop now (atomic writes leave no torn file)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def trigger_tokens(captions: Sequence[str]) -> list[str]:
    """Words every caption holds, in the first caption's order: what a prompt must say to call
    up what the adapter learned (for a folder captioned "sks dog, ...", ["sks", "dog"])."""
    if not captions:
        return []
    words = [w.strip(",.;:()[]{}").lower() for w in captions[0].replace(",", " ").split()]
    common = set(words)
    for text in captions[1:]:
        common &= {w.strip(",.;:()[]{}").lower() for w in text.replace(",", " ").split()}
    return [w for i, w in enumerate(words) if w and w in common and w not in words[:i]]


def _identity(method: Method, components: Components) -> dict[str, str]:
    """What a checkpoint must match to be resumed by this run."""
    return {
        "sdserve_method": method.kind,
        "sdserve_base_model_family": components.family,
        "sdserve_base_model_sha256": components.digest,
        **{k: v for k, v in method.metadata().items() if k != "sdserve_trigger_tokens"},
    }


def _check_data(data: CaptionedImages, components: Components, cfg: LoopConfig, flag: str) -> None:
    if len(data) == 0:
        raise InvalidArgument("holds no images", field=flag)
    if cfg.resolution is not None and data.resolution != cfg.resolution:
        raise InvalidArgument(f"images are {data.resolution}px, --resolution is {cfg.resolution}", field=flag)
    multiple = components.resolution_multiple
    if data.resolution % multiple:
        raise InvalidArgument(
            f"{data.resolution} is not a multiple of {multiple} (this model's VAE and UNet downsampling)",
            field="--resolution",
        )


def check_loop_config(cfg: LoopConfig) -> None:
    """One-line errors naming the flag of a value the loop cannot run with."""
    checks = [
        (cfg.steps >= 0, "--steps", f"must be >= 0 (got {cfg.steps})"),
        (math.isfinite(cfg.lr) and cfg.lr > 0, "--lr", f"must be a positive number (got {cfg.lr})"),
        (cfg.lr_schedule in LR_SCHEDULES, "--lr-schedule",
         f"must be one of {', '.join(LR_SCHEDULES)} (got {cfg.lr_schedule!r})"),
        (cfg.batch_size >= 1, "--batch-size", f"must be >= 1 (got {cfg.batch_size})"),
        (cfg.save_every >= 0, "--save-every", f"must be >= 0 (got {cfg.save_every})"),
        (cfg.threads >= 1, "--threads", f"must be >= 1 (got {cfg.threads})"),
        (math.isfinite(cfg.prior_loss_weight) and cfg.prior_loss_weight >= 0, "--prior-loss-weight",
         f"must be a number >= 0 (got {cfg.prior_loss_weight})"),
        (cfg.min_snr_gamma is None or cfg.min_snr_gamma > 0, "--min-snr-gamma",
         f"must be positive (got {cfg.min_snr_gamma})"),
    ]
    for ok, flag, problem in checks:
        if not ok:
            raise InvalidArgument(problem, field=flag)


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(cfg: LoopConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): lr_schedule's curve at step / steps."""
    if cfg.lr_schedule == "cosine" and cfg.steps > 0:
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))
    return cfg.lr


def _resume(
    cfg: LoopConfig, method: Method, optimizer: torch.optim.Optimizer, identity: dict[str, str]
) -> int:
    """Load `cfg.resume`'s checkpoint into the method and optimizer; -> its step."""
    assert cfg.resume is not None
    path = Path(cfg.resume) / CHECKPOINT_FILE
    if not path.is_file():
        raise InvalidArgument(f"{cfg.resume} holds no {CHECKPOINT_FILE}", field="--resume")
    try:
        state = load_checkpoint(path)
    except Exception as error:  # a torn or foreign file: torch raises many kinds
        raise InvalidArgument(f"{path} is not a readable checkpoint ({type(error).__name__})",
                              field="--resume") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InvalidArgument(f"{path} is not an sdserve adapter checkpoint", field="--resume")
    theirs = state.get("identity", {})
    for key, ours in identity.items():
        if theirs.get(key) != ours:
            what = key.removeprefix(METADATA_PREFIX)
            raise InvalidArgument(
                f"the checkpoint was made with {what} {theirs.get(key)!r}, this run has {ours!r}",
                field="--resume",
            )
    step = int(state["step"])
    if step > cfg.steps:
        raise InvalidArgument(f"the checkpoint is at step {step}, beyond --steps {cfg.steps}", field="--resume")
    try:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise InvalidArgument(f"the checkpoint does not fit this method ({error})".splitlines()[0],
                              field="--resume") from None
    for group in optimizer.param_groups:  # load_state_dict restored the old run's; this run's flags win
        group["weight_decay"] = cfg.weight_decay  # (the rate is set before every step: learning_rate)
    return step


class _Checkpoints:
    """The run's checkpoint file: trainable state, optimizer state and step, plus the identity a
    resume must match. Remembers the last step saved, which a divergence message names."""

    def __init__(self, state_dir: Path, identity: dict[str, str], saved_step: int | None) -> None:
        self.state_dir, self.identity, self.saved_step = state_dir, identity, saved_step
        self.path = state_dir / CHECKPOINT_FILE

    def save(self, step: int, method: Method, optimizer: torch.optim.Optimizer) -> None:
        save_checkpoint(self.path, {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "identity": self.identity,
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
        })
        self.saved_step = step

    def kept(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was saved before it"
        return f"the last good checkpoint (step {self.saved_step}) is in {self.state_dir}"


# latents [N, C, h, w], the images they encode and the images' loss masks at latent size [N, 1, h, w]
_Images = tuple[torch.Tensor, CaptionedImages, torch.Tensor | None]


def _batch(step: int, cfg: LoopConfig, data: _Images, reg: _Images | None,
           method: Method) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """Step `step`'s latents [B', C, h, w], captions and loss masks: B instance images, then B
    regularization images when there are any (B' = B or 2B); the masks [B, 1, h, w] are the
    instance images' (None without --mask-data). A method with `use_rows` is told the instance
    images' indices (see the module docstring)."""
    latents, images, masks = data
    indices = batch_indices(cfg.seed, _STREAM_IMAGES, step, cfg.batch_size, len(images))
    use_rows = getattr(method, "use_rows", None)
    if use_rows is not None:
        use_rows(indices)
    batch, captions = latents[indices], [images.captions[i] for i in indices]  # [B, C, h, w]
    if reg is not None:
        reg_latents, reg_images, _ = reg
        indices_reg = batch_indices(cfg.seed, _STREAM_REG_IMAGES, step, cfg.batch_size, len(reg_images))
        batch = torch.cat([batch, reg_latents[indices_reg]])  # [2B, C, h, w]
        captions += [reg_images.captions[i] for i in indices_reg]
    return batch, captions, masks[indices] if masks is not None else None


def latent_masks(images: CaptionedImages, latents: torch.Tensor) -> torch.Tensor | None:
    """The images' loss masks [N, 1, R, R] averaged over each latent pixel's R/h x R/h patch:
    [N, 1, h, w], the share of that latent's pixels that count (None without masks)."""
    if images.masks is None:
        return None
    return F.adaptive_avg_pool2d(images.masks, latents.shape[-2:])  # [N, 1, h, w]


def _loss(method: Method, components: Components, batch: torch.Tensor, captions: list[str],
          cfg: LoopConfig, step: int, masks: torch.Tensor | None = None) -> torch.Tensor:
    """The step's loss: timesteps and noise from the (seed, step) generator, the method's
    prediction against the base model's target; mean over the instance images plus
    prior_loss_weight times the mean over the regularization images. With `masks` [B, 1, h, w]
    an instance image's squared error is the mask-weighted mean, sum(m * e) / sum(m), so a small
    masked region weighs as much as a large one (regularization images count whole)."""
    objective = components.objective
    generator = seeded_generator(cfg.seed, _STREAM_NOISE, step)
    timesteps = torch.randint(0, objective.num_timesteps, (len(batch),), generator=generator)  # [B']
    noise = torch.randn(batch.shape, generator=generator)  # [B', C, h, w]
    noisy = objective.add_noise(batch, noise, timesteps)
    target = objective.target(batch, noise, timesteps)  # [B', C, h, w]
    prediction = method.predict(noisy, timesteps, captions)  # [B', C, h, w]
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")  # [B', C, h, w]
    if masks is None:
        per_sample = squared.mean(dim=(1, 2, 3))  # [B']
    else:
        weight = torch.ones_like(squared[:, :1])  # [B', 1, h, w]
        weight[: len(masks)] = masks
        per_sample = (squared * weight).sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3)) * squared.shape[1])
    per_sample = per_sample * objective.weights(timesteps, cfg.min_snr_gamma)
    loss = per_sample[: cfg.batch_size].mean()
    if len(batch) > cfg.batch_size:
        loss = loss + cfg.prior_loss_weight * per_sample[cfg.batch_size :].mean()
    return loss


def _output_metadata(method: Method, components: Components, cfg: LoopConfig, step: int,
                     data: CaptionedImages | None, reg: CaptionedImages | None) -> dict[str, str]:
    """The output's provenance: the loop's keys, then the method's (which may override them,
    e.g. a textual inversion's trigger tokens are its placeholder tokens)."""
    metadata = {
        "sdserve_method": method.kind,
        "sdserve_base_model": components.name,
        "sdserve_base_model_family": components.family,
        "sdserve_base_model_sha256": components.digest,
        "sdserve_prediction_type": components.prediction_type,
        "sdserve_steps": str(step),
        "sdserve_batch_size": str(cfg.batch_size),
        "sdserve_learning_rate": repr(cfg.lr),
        "sdserve_lr_schedule": cfg.lr_schedule,
        "sdserve_seed": str(cfg.seed),
        "sdserve_resolution": str(data.resolution if data is not None else cfg.resolution or components.resolution),
        "sdserve_images": str(len(data) if data is not None else 0),
        "sdserve_reg_images": str(len(reg) if reg is not None else 0),
        "sdserve_masked_loss": str(data is not None and data.masks is not None).lower(),
        "sdserve_trigger_tokens": ",".join(trigger_tokens(data.captions)) if data is not None else "",
        "sdserve_version": __version__,
    }
    return metadata | method.metadata()


@keeps_torch_threads
def train(
    method: Method,
    components: Components,
    data: CaptionedImages | None,
    cfg: LoopConfig,
    out: Path,
    reg: CaptionedImages | None = None,
) -> Result:
    """Train `method` on `data` (and `reg`, the regularization images) and write `out`; with
    `data` None, on the method's own `step_loss` (see the module docstring).

    Raises InvalidArgument for bad input (before any training), Diverged when the loss or the
    gradient turns non-finite (the last good checkpoint is kept, no output is written), and
    Interrupted on SIGINT/SIGTERM (a checkpoint of the last completed step is written first).
    """
    out = Path(out)
    state_dir = Path(cfg.state_dir) if cfg.state_dir is not None else default_state_dir(out)
    check_loop_config(cfg)
    check_writable(out, "--out")
    check_directory_writable(state_dir, "--state-dir")
    step_loss = getattr(method, "step_loss", None) if data is None else None  # see the module docstring
    if data is None and (step_loss is None or reg is not None):
        raise ValueError("train(data=None) needs a method with step_loss and no reg data")
    if data is not None:
        _check_data(data, components, cfg, "--data")
        check_method_data = getattr(method, "check_data", None)  # optional: see the module docstring
        if check_method_data is not None:
            check_method_data(data)
    if reg is not None:
        _check_data(reg, components, cfg, "--reg-data")
        if reg.resolution != data.resolution:
            raise InvalidArgument(f"images are {reg.resolution}px, --data's {data.resolution}px", field="--reg-data")
    torch.set_num_threads(cfg.threads)

    parameters = method.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    identity = _identity(method, components)
    start = _resume(cfg, method, optimizer, identity) if cfg.resume is not None else 0

    latents = components.encode_images(data.images) if data is not None else None  # [N, C, h, w]
    reg_latents = components.encode_images(reg.images) if reg is not None else None  # [M, C, h, w]
    data_masks = latent_masks(data, latents) if data is not None else None  # [N, 1, h, w]
    checkpoints = _Checkpoints(state_dir, identity, start if cfg.resume is not None else None)
    losses: list[float] = []
    step = start
    bar = tqdm(total=cfg.steps, initial=start, desc=method.kind, unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    with _StopSignals() as stop:  # held until the output is written: a signal then waits for it
        with bar:
            while step < cfg.steps:
                if step_loss is not None:
                    loss = step_loss(step, seeded_generator(cfg.seed, _STREAM_NOISE, step))
                else:
                    batch, captions, masks = _batch(step, cfg, (latents, data, data_masks),
                                                    (reg_latents, reg, None) if reg else None, method)
                    loss = _loss(method, components, batch, captions, cfg, step, masks)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise Diverged(f"the loss became {value} at step {step + 1}; {checkpoints.kept()}",
                                   step, checkpoints.path)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = float(torch.nn.utils.clip_grad_norm_(parameters, cfg.max_grad_norm))
                if not math.isfinite(norm):
                    raise Diverged(f"the gradient became {norm} at step {step + 1}; {checkpoints.kept()}",
                                   step, checkpoints.path)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, step)
                optimizer.step()
                step += 1
                losses.append(value)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                bar.update(1)
                if stop.signum is not None:
                    checkpoints.save(step, method, optimizer)
                    raise Interrupted(
                        f"stopped by {signal.Signals(stop.signum).name} after step {step}; checkpoint saved in "
                        f"{state_dir} (continue with --resume {state_dir})", step, checkpoints.path, stop.signum,
                    )
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    checkpoints.save(step, method, optimizer)
        checkpoints.save(step, method, optimizer)  # so a later run with more --steps continues from here
        metadata = _output_metadata(method, components, cfg, step, data, reg)
        atomic_write(out, lambda temporary: method.write(temporary, dict(metadata)))
    return Result(out=out, steps=step, losses=tuple(losses), state_dir=state_dir, metadata=metadata)

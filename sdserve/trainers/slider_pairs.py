"""Visual Concept Sliders (Gandikota et al. 2023, "visual sliders"): a LoRA learned from image pairs.

A folder holds pairs `DIR/before/NAME.png` and `DIR/after/NAME.png` (PNG, JPEG or WebP, any of
data.IMAGE_SUFFIXES) that show the same scene with one attribute changed. Each step draws pairs,
one timestep t and one noise ε per pair, and noises both images of a pair with them:

    x_t^after  = q(x^after,  ε, t)    x_t^before = q(x^before, ε, t)
    loss = ½ (mse(out_{+S}(x_t^after, c, t), target(x^after, ε, t))
            + mse(out_{-S}(x_t^before, c, t), target(x^before, ε, t)))

with out_s the model with the LoRA at scale s (S = 1 by default, `--train-scale`) and `target`
the base model's training target (ε, or v for a v-prediction model, as the shared loop's).
Shared noise and timestep mean that the two terms differ only through the attribute: what the
LoRA must add at +S and remove at -S is
the difference the pairs show, while everything the images share is what the frozen model
already predicts. Scales between and beyond interpolate and extrapolate, as for the text slider.

Captions: `before/NAME.txt`, else `after/NAME.txt` (both present must agree), else the
`default_caption` (`--target`), else the empty prompt. Images are read and squared as every
trainer's (data.read_image, data.square) at the model's native resolution.

Bad input is one line naming the file or flag, before anything is trained or written: a missing
`before/` or `after/`, a NAME in one without a partner in the other, a pair whose two images
differ in size, no pairs at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdserve.errors import InvalidArgument
from sdserve.trainers.components import Components
from sdserve.trainers.data import IMAGE_SUFFIXES, MAX_CAPTION_CHARS, read_image, square
from sdserve.trainers.loop import batch_indices
from sdserve.trainers.lora import LoRAConfig, check_config
from sdserve.trainers.slider import SliderLoRA, _rows

BEFORE, AFTER = "before", "after"
_STREAM_PAIRS = 32  # batch_indices stream of the pairs' order (the loop's own streams are 11-13)


@dataclass(frozen=True)
class PairSliderConfig:
    """The visual slider's settings; `sdserve train slider --pairs` flags mirror these fields."""

    batch_size: int = 1
    """Pairs per step (each pair is two UNet rows: after at +S, before at -S)."""
    scale: float = 1.0
    """S: the LoRA at +S denoises the after images, at -S the before images; the file records the
    scale range -S,S. The same function as S = 1 with the LoRA's delta S times larger, but what a
    user serves at scale s is then s/S of the trained edit: with S = 2, scales -2..2 stay within
    what was trained (a slider trained at +-1 and served at +-2 extrapolates, and on the bench's
    size pairs the shape then vanished at -2 and fell back at +2; docs/benchmarks.md)."""
    start: float = 0.0
    """Suggested fraction of the denoising steps after which to apply it (metadata only)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass(frozen=True)
class ImagePairs:
    """A pairs folder read into two aligned uint8 tensors."""

    before: torch.Tensor  # [N, 3, R, R] uint8
    after: torch.Tensor  # [N, 3, R, R] uint8
    captions: tuple[str, ...]  # [N]
    names: tuple[str, ...]  # [N] NAME (the file stem), sorted
    root: Path

    def __len__(self) -> int:
        return len(self.names)

    def digest(self) -> str:
        """sha256 of the pixels and captions: a checkpoint of other pairs is not resumed."""
        hasher = hashlib.sha256()
        for tensor in (self.before, self.after):
            hasher.update(tensor.contiguous().numpy().tobytes())
        hasher.update("\x00".join(self.captions).encode("utf-8"))
        return hasher.hexdigest()


def check_pair_slider_config(config: PairSliderConfig) -> None:
    """One-line errors naming the flag, before any model is loaded."""
    check_config(config.lora)
    if config.lora.text_encoder:
        raise InvalidArgument("sliders train the UNet only", field="--text-encoder")
    if config.batch_size < 1:
        raise InvalidArgument(f"must be >= 1 (got {config.batch_size})", field="--batch-size")
    if not (np.isfinite(config.scale) and 0 < config.scale <= 8):
        raise InvalidArgument(f"must be a number in (0, 8] (got {config.scale})", field="--train-scale")
    if not 0.0 <= config.start < 1.0:
        raise InvalidArgument(f"must be in [0, 1) (got {config.start})", field="--start")


def _images_by_name(folder: Path) -> dict[str, Path]:
    """NAME -> image file of a side folder; two images with one NAME (a.png, a.jpg) are refused."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise InvalidArgument(f"two images named {path.stem!r} ({files[path.stem].name}, {path.name})",
                                  field=str(folder))
        files[path.stem] = path
    return files


def _caption(before: Path, after: Path, default: str) -> str:
    """before/NAME.txt, else after/NAME.txt (both: they must agree), else `default`."""
    texts = {}
    for image in (before, after):
        text_file = image.with_suffix(".txt")
        if text_file.is_file():
            try:
                texts[text_file] = text_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as error:
                raise InvalidArgument(f"cannot read as UTF-8 text ({error})", field=str(text_file)) from None
    if len(set(texts.values())) > 1:
        first, second = texts
        raise InvalidArgument(f"caption differs from {second} (a pair has one caption; write one of them)",
                              field=str(first))
    text = next(iter(texts.values()), default)
    if len(text) > MAX_CAPTION_CHARS:
        raise InvalidArgument(f"caption longer than {MAX_CAPTION_CHARS} characters", field=str(before))
    return text


def scan_pairs(path: Path, flag: str = "--pairs") -> list[tuple[str, Path, Path]]:
    """(NAME, before file, after file) of every pair, sorted by NAME; one-line InvalidArgument for a
    missing side folder, a NAME without its partner (named), or no pairs. Reads no pixels."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidArgument(f"{root} is not a directory", field=flag)
    sides = {}
    for side in (BEFORE, AFTER):
        folder = root / side
        if not folder.is_dir():
            raise InvalidArgument(f"{root} has no {side}/ folder (pairs are {BEFORE}/NAME.png and "
                                  f"{AFTER}/NAME.png)", field=flag)
        sides[side] = _images_by_name(folder)
    for side, other in ((BEFORE, AFTER), (AFTER, BEFORE)):
        lonely = sorted(set(sides[side]) - set(sides[other]))
        if lonely:
            more = f" (and {len(lonely) - 1} more)" if len(lonely) > 1 else ""
            raise InvalidArgument(f"{side}/{sides[side][lonely[0]].name} has no partner in {other}/{more}",
                                  field=flag)
    if not sides[BEFORE]:
        raise InvalidArgument(f"{root} holds no pairs ({BEFORE}/ and {AFTER}/ have no PNG, JPEG or WebP images)",
                              field=flag)
    return [(name, sides[BEFORE][name], sides[AFTER][name]) for name in sorted(sides[BEFORE])]


def load_pairs(path: Path, resolution: int, default_caption: str = "", flag: str = "--pairs") -> ImagePairs:
    """Read a pairs folder (see the module docstring) into square `resolution` images."""
    if resolution < 8:
        raise InvalidArgument(f"must be at least 8 pixels (got {resolution})", field="--resolution")
    befores, afters, captions, names = [], [], [], []
    for name, before_file, after_file in scan_pairs(path, flag):
        before, after = read_image(before_file), read_image(after_file)
        if before.size != after.size:
            raise InvalidArgument(f"pair {name!r}: {BEFORE}/{before_file.name} is {before.size[0]}x{before.size[1]}, "
                                  f"{AFTER}/{after_file.name} {after.size[0]}x{after.size[1]} (a pair must "
                                  "show one scene at one size)", field=flag)
        for image, out in ((before, befores), (after, afters)):
            pixels = np.asarray(square(image, resolution))  # [R, R, 3] uint8
            out.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # [3, R, R]
        captions.append(_caption(before_file, after_file, default_caption))
        names.append(name)
    return ImagePairs(before=torch.stack(befores), after=torch.stack(afters), captions=tuple(captions),
                      names=tuple(names), root=Path(path))


class PairSliderMethod(SliderLoRA):
    """The visual slider for `loop.train(data=None)`: its `step_loss` draws its own pairs."""

    def __init__(self, components: Components, config: PairSliderConfig, pairs: ImagePairs, seed: int = 0) -> None:
        check_pair_slider_config(config)
        multiple = components.resolution_multiple
        side = int(pairs.before.shape[-1])
        if side % multiple:
            raise InvalidArgument(f"{side} is not a multiple of {multiple} (this model's VAE and UNet "
                                  "downsampling)", field="--resolution")
        super().__init__(components, config.lora, config.start, seed=seed)
        self.config, self.pairs = config, pairs
        self._digest = pairs.digest()
        with torch.no_grad():  # frozen VAE and text encoders: encoded once, as the loop encodes --data
            self.latents_before = components.encode_images(pairs.before)  # [N, C, h, w]
            self.latents_after = components.encode_images(pairs.after)  # [N, C, h, w]
            self.conditioning = components.encode_text(list(pairs.captions), resolution=side)

    def metadata(self) -> dict[str, str]:
        scale = self.config.scale
        return self.slider_metadata("visual", (-scale, scale)) | {
            "sdserve_slider_pairs": str(len(self.pairs)),
            "sdserve_slider_pairs_sha256": self._digest,
            "sdserve_slider_pair_batch": str(self.config.batch_size),
        }

    def step_loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        """Step `step`'s loss: pairs from seeded per-epoch permutations (each pair once an epoch),
        then one timestep and one noise per pair from `generator`, shared by its two images."""
        objective, count = self.components.objective, len(self.pairs)
        rows = batch_indices(self.seed, _STREAM_PAIRS, step, self.config.batch_size, count)  # [B]
        timesteps = torch.randint(0, objective.num_timesteps, (len(rows),), generator=generator)  # [B]
        after, before = self.latents_after[rows], self.latents_before[rows]  # [B, C, h, w] each
        noise = torch.randn(after.shape, generator=generator)  # [B, C, h, w]
        latents = torch.cat([after, before])  # [2B, C, h, w]: after rows at +S, before rows at -S
        noise2, timesteps2 = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])  # [2B, ...]
        noisy = objective.add_noise(latents, noise2, timesteps2)
        target = objective.target(latents, noise2, timesteps2)  # [2B, C, h, w]
        signs = torch.tensor([1.0, -1.0]).repeat_interleave(len(rows)) * self.config.scale  # [2B]: +S, -S
        self.set_scale(signs)
        prediction = self.components.predict(noisy, timesteps2, _rows(self.conditioning, rows * 2))
        self.set_scale(1.0)  # the trained scale: what `predict` and the written file mean
        per_row = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # [2B]
        return (per_row[: len(rows)].mean() + per_row[len(rows) :].mean()) / 2


"""ControlNet units per request: models, validation, and per-row residuals.

A unit runs only on the rows of the requests that use it: the batch gathers those rows (their
scaled latents, timesteps, text states, control images), the ControlNet runs once on them, and
its residuals, times each row's scale, are added to those rows alone; other rows read zeros,
which the UNet adds as +0. Several units of one request sum in the request's order, as
diffusers' MultiControlNetModel sums them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from sdserve.adapters.conditioning import DEFAULT_CONDITIONING_CHANNELS, FITTING_KEYS
from sdserve.api.types import ControlSpec
from sdserve.engine.model import MODULE_BUILD_LOCK, ModelInfo
from sdserve.engine.store import DirectoryModel, DirectoryRegistry, WeightKey
from sdserve.errors import InvalidArgument

PREPROCESSORS = ("none", "canny")
MAX_UNITS = 4
# (imported above) FITTING_KEYS: a ControlNet's and its UNet's must agree (the upload check of a packed ControlNet
# uses the same ones). DEFAULT_CONDITIONING_CHANNELS: diffusers' ControlNetModel default, three
# stride-2 convs that take a control image down 8x, to SD's latent grid. The stride must equal the
# base model's VAE scale or the residuals do not line up with the latents: the UNet call then
# raises on every request instead of refusing the first.


@dataclass(frozen=True)
class ControlUnit:
    """A validated unit: `model` is a name in the ControlNetStore, `image` a PIL RGB control map."""

    model: str
    image: Any
    scale: float
    start: float
    end: float
    preprocess: str = "none"
    source: DirectoryModel | None = field(default=None, compare=False, repr=False)  # what `model` named


class ControlNetStore(DirectoryRegistry):
    """ControlNet models by name (operator-registered directories, or a directory the CLI names);
    loaded, kept and evicted by the engine's residency store (engine/store.py), keyed by the
    directory's digest and the device and dtype it was loaded for."""

    kind = "controlnet"
    what = "ControlNet model"

    def is_model_dir(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file()

    def describe(self, path: Path) -> dict[str, Any]:
        config = json.loads((path / "config.json").read_text())
        channels = config.get("conditioning_embedding_out_channels") or DEFAULT_CONDITIONING_CHANNELS
        return {**{key: config.get(key) for key in FITTING_KEYS}, "conditioning_stride": 2 ** (len(channels) - 1)}

    def check_fits(self, name: str, info: ModelInfo, field: str) -> DirectoryModel:
        """The registered model if it was made for `info`'s UNet (no file is read). A compiled
        model serves the ControlNets exported with it, as their graphs (engine/onnx_backend.py)."""
        if info.backend != "eager":
            from sdserve.engine.onnx_backend import exported_controlnet

            return exported_controlnet(self, name, info, field)
        model = self.resolve(name, field)
        for key in FITTING_KEYS:
            ours, theirs = model.facts.get(key), info.unet_config.get(key)
            if ours != theirs:
                raise InvalidArgument(f"was made for another base model ({key} {ours} vs {theirs})", field=field)
        stride = model.facts.get("conditioning_stride")
        if stride != info.vae_scale_factor:
            raise InvalidArgument(
                f"takes control images down {stride}x but the base model's VAE scale is {info.vae_scale_factor}x "
                "(conditioning_embedding_out_channels does not fit this model)",
                field=field,
            )
        if info.unet_in_channels != 4:
            raise InvalidArgument("ControlNet units are not supported with inpainting UNets", field=field)
        return model

    def key(self, model: DirectoryModel, device: torch.device, dtype: torch.dtype) -> WeightKey:
        return WeightKey(self.kind, model.digest, f"{device}/{dtype}")

    def loader(self, model: DirectoryModel, device: torch.device, dtype: torch.dtype) -> Callable[[], torch.nn.Module]:
        return partial(_load_controlnet, model.path, device, dtype)

    def get(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """The loaded ControlNet `name`: held by the store (admission loaded and pinned it for the
        requests that use it), else loaded now."""
        model = self.resolve(name, "controlnets")
        key = self.key(model, device, dtype)
        net = self.weights.peek(key)
        return net if net is not None else self.weights.get_now(key, self.loader(model, device, dtype))


def _load_controlnet(path: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import ControlNetModel

    with MODULE_BUILD_LOCK:
        net = ControlNetModel.from_pretrained(path, torch_dtype=dtype)
        return net.to(device).eval().requires_grad_(False)


def resolve_units(
    specs: tuple[ControlSpec, ...], info: ModelInfo, store: ControlNetStore
) -> tuple[ControlUnit, ...]:
    from sdserve.engine.images import canny, decode_image

    if len(specs) > MAX_UNITS:
        raise InvalidArgument(f"at most {MAX_UNITS} ControlNet units per request", field="controlnets")
    units = []
    for index, spec in enumerate(specs):
        where = f"controlnets[{index}]"
        if not spec.model:
            raise InvalidArgument("needs a model", field=f"{where}.model")
        source = store.check_fits(spec.model, info, f"{where}.model")
        preprocess = spec.preprocess or "none"
        if preprocess not in PREPROCESSORS:
            raise InvalidArgument(f"must be one of {', '.join(PREPROCESSORS)}", field=f"{where}.preprocess")
        if not spec.image:
            raise InvalidArgument("needs an image", field=f"{where}.image")
        image = decode_image(spec.image, f"{where}.image", max_pixels=info.limits.max_pixels)
        if preprocess == "canny":
            image = canny(image)
        scale = 1.0 if spec.scale is None else float(spec.scale)
        start = 0.0 if spec.start is None else float(spec.start)
        end = 1.0 if spec.end is None else float(spec.end)
        if not (-100.0 <= scale <= 100.0):
            raise InvalidArgument("must be between -100 and 100", field=f"{where}.scale")
        if not (0.0 <= start <= 1.0):
            raise InvalidArgument(f"must be between 0 and 1 (got {start})", field=f"{where}.start")
        if not (start <= end <= 1.0):
            raise InvalidArgument(f"must be between start ({start}) and 1 (got {end})", field=f"{where}.end")
        units.append(ControlUnit(spec.model, image, scale, start, end, preprocess, source))
    return tuple(units)


@dataclass
class PreparedControl:
    """A unit on the device: the control image as the ControlNet reads it."""

    unit: ControlUnit
    cond: torch.Tensor  # [num_images, 3, H, W] in [0, 1]


def prepare_controls(request, model) -> list[PreparedControl]:
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(
        vae_scale_factor=model.info.vae_scale_factor, do_convert_rgb=True, do_normalize=False
    )
    prepared = []
    for unit in request.controlnets:
        image = processor.preprocess(unit.image, height=request.height, width=request.width).to(torch.float32)
        image = image.repeat_interleave(request.num_images, dim=0).to(model.device, model.dtype)
        prepared.append(PreparedControl(unit, image))
    return prepared


@dataclass
class ControlSegment:
    row_start: int
    row_stop: int
    cond: torch.Tensor  # [rows, 3, H, W]
    scale: float


def control_residuals(batch, model, store: ControlNetStore):
    """(down residuals, mid residual) for the whole batch, or (None, None) when no row uses one."""
    if not batch.controls:
        return None, None
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for (name, _unit_index), segments in batch.controls.items():
        net = store.get(name, model.device, model.dtype)
        rows = torch.cat([torch.arange(s.row_start, s.row_stop) for s in segments]).to(batch.sample.device)
        scales = torch.cat(
            [torch.full((s.row_stop - s.row_start,), s.scale, dtype=batch.sample.dtype) for s in segments]
        ).to(batch.sample.device)
        added = None
        if batch.text_embeds is not None:
            added = {"text_embeds": batch.text_embeds[rows], "time_ids": batch.time_ids[rows]}
        unit_down, unit_mid = net(
            batch.sample[rows],
            batch.timesteps[rows],
            encoder_hidden_states=batch.encoder_hidden_states[rows],
            controlnet_cond=torch.cat([s.cond for s in segments]),
            conditioning_scale=1.0,
            added_cond_kwargs=added,
            return_dict=False,
        )
        if down is None:
            down = [torch.zeros((batch.num_rows, *d.shape[1:]), dtype=d.dtype, device=d.device) for d in unit_down]
            mid = torch.zeros((batch.num_rows, *unit_mid.shape[1:]), dtype=unit_mid.dtype, device=unit_mid.device)
        row_scale = scales.view(-1, 1, 1, 1)
        for total, residual in zip(down, unit_down):
            total.index_add_(0, rows, residual * row_scale)
        mid.index_add_(0, rows, unit_mid * row_scale)
    return down, mid

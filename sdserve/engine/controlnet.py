"""ControlNet units per request: models, validation, and per-row residuals.

A unit runs only on the rows of the requests that use it: the batch gathers those rows (their
scaled latents, timesteps, text states, control images), the ControlNet runs once on them, and
its residuals, times each row's scale, are added to those rows alone; other rows read zeros,
which the UNet adds as +0. Several units of one request sum in the request's order, as
diffusers' MultiControlNetModel sums them.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdserve.engine.model import ModelInfo
from sdserve.errors import InvalidArgument, NotFound

PREPROCESSORS = ("none", "canny")
MAX_UNITS = 4


@dataclass(frozen=True)
class ControlSpec:
    """One unit as given: the proto's ControlNetUnit (None = absent)."""

    model: str
    image: bytes
    preprocess: str = ""
    scale: float | None = None
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class ControlUnit:
    """A validated unit: `model` is a key of the ControlNetStore, `image` a PIL RGB control map."""

    model: str
    image: Any
    scale: float
    start: float
    end: float
    preprocess: str = "none"


class ControlNetStore:
    """Registered ControlNet models (name -> directory) plus local directories; loaded once."""

    def __init__(self, allow_paths: bool = True) -> None:
        self.allow_paths = allow_paths
        self._registered: dict[str, Path] = {}
        self._loaded: dict[str, torch.nn.Module] = {}
        self._lock = threading.Lock()

    def register(self, name: str, path: Path) -> None:
        self._registered[name] = Path(path)

    def path_of(self, name: str, field: str) -> Path:
        if name in self._registered:
            return self._registered[name]
        if self.allow_paths and Path(name).is_dir() and (Path(name) / "config.json").is_file():
            return Path(name).resolve()
        raise NotFound("unknown ControlNet model", field=field)

    def check_fits(self, name: str, info: ModelInfo, field: str) -> None:
        config = json.loads((self.path_of(name, field) / "config.json").read_text())
        unet = json.loads((info.path / "unet" / "config.json").read_text())
        for key in ("cross_attention_dim", "block_out_channels"):
            if config.get(key) != unet.get(key):
                raise InvalidArgument(
                    f"was made for another base model ({key} {config.get(key)} vs {unet.get(key)})", field=field
                )
        if info.unet_in_channels != 4:
            raise InvalidArgument("ControlNet units are not supported with inpainting UNets", field=field)

    def get(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import ControlNetModel

        with self._lock:
            if name not in self._loaded:
                net = ControlNetModel.from_pretrained(self.path_of(name, "controlnets"), torch_dtype=dtype)
                self._loaded[name] = net.to(device).eval().requires_grad_(False)
            return self._loaded[name]


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
        store.check_fits(spec.model, info, f"{where}.model")
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
        units.append(ControlUnit(spec.model, image, scale, start, end, preprocess))
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

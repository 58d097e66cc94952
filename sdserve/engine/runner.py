"""The runner: one denoising step for every row of a batch.

A backend predicts the noise for all rows in one call; the runner then applies each request's
guidance and its own scheduler step. The eager backend serves any mix of requests; a model
compiled to ONNX (`ModelInfo.backend == "onnxruntime"`) runs on the onnxruntime backend
(engine/onnx_backend.py), which serves only requests without per-request weights (validation
refuses the others) and ControlNet units of the ControlNets exported with the model. The
backend is picked per model, so a batch (one model) has one backend.
"""

from __future__ import annotations

from typing import Protocol

import torch

from sdserve.engine.batch import Batch
from sdserve.engine.controlnet import ControlNetStore, control_residuals
from sdserve.engine.init_latents import blend_known_latents
from sdserve.engine.model import LoadedModel


class UNetBackend(Protocol):
    name: str

    def predict_noise(self, model: LoadedModel, batch: Batch) -> torch.Tensor:
        """Noise (or v) prediction for every row: [rows, C, h, w]."""
        ...


class EagerBackend:
    """The model's own PyTorch modules; serves every request."""

    name = "eager"

    def __init__(self, controlnets: ControlNetStore | None = None) -> None:
        self.controlnets = controlnets or ControlNetStore()

    def predict_noise(self, model: LoadedModel, batch: Batch) -> torch.Tensor:
        added = None
        if batch.text_embeds is not None:
            added = {"text_embeds": batch.text_embeds, "time_ids": batch.time_ids}
        if model.adapters is None:
            return self._unet(model, batch, added)
        # One row context for the whole call: every adapter-aware module reads the batch's rows.
        with model.adapters.rows(batch.rows):
            return self._unet(model, batch, added)

    def _unet(self, model: LoadedModel, batch: Batch, added: dict | None) -> torch.Tensor:
        down, mid = control_residuals(batch, model, self.controlnets)
        return model.unet(
            batch.sample,
            batch.timesteps,
            encoder_hidden_states=batch.encoder_hidden_states,
            added_cond_kwargs=added,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


def advance(batch: Batch, noise_pred: torch.Tensor) -> None:
    """Guidance and the scheduler step, request by request, on that request's rows alone."""
    for entry in batch.entries:
        state = entry.state
        pred = noise_pred[entry.row_start : entry.row_stop]  # [rows_i, C, h, w]
        if entry.guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + state.request.guidance_scale * (cond - uncond)
        state.latents = state.scheduler.step(
            pred, entry.timestep, state.latents, **state.step_kwargs, return_dict=False
        )[0]
        if state.inpainting is not None and state.inpainting.mode == "blend":
            state.latents = blend_known_latents(
                state.latents, state.inpainting, state.scheduler, state.timesteps, state.step_index
            )
        state.step_index += 1


class Runner:
    def __init__(self, backend: UNetBackend | None = None) -> None:
        self.backend = backend or EagerBackend()
        self.controlnets: ControlNetStore = getattr(self.backend, "controlnets", ControlNetStore())
        self._compiled: dict[str, UNetBackend] = {}  # backend name -> backend, made on first use

    def backend_for(self, model: LoadedModel) -> UNetBackend:
        """The backend that runs `model`'s UNet: the runner's own, or onnxruntime for a compiled dir."""
        name = model.info.backend
        if name == "eager":
            return self.backend
        if name not in self._compiled:
            from sdserve.engine.onnx_backend import BACKEND, OnnxBackend

            if name != BACKEND:
                raise ValueError(f"no runner backend named {name!r}")
            self._compiled[name] = OnnxBackend(self.controlnets)
        return self._compiled[name]

    @torch.inference_mode()
    def step(self, model: LoadedModel, batch: Batch) -> None:
        noise_pred = self.backend_for(model).predict_noise(model, batch)
        advance(batch, noise_pred)

"""A batch: the rows of several requests that share one UNet call.

Each request owns a contiguous range of rows (`[uncond × n, cond × n]` under guidance). Per-row
data is gathered here so that a backend sees plain tensors, filled from each request's state at
each step; what the adapter-aware modules read (LoRA stacks, IP-Adapter branches, hypernetworks)
is gathered into the batch's one `RowContext`, which the runner sets for the UNet call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdserve.engine.activity import active_at
from sdserve.engine.controlnet import ControlSegment
from sdserve.engine.row_context import RowContext
from sdserve.engine.state import GroupKey, RequestState


@dataclass
class BatchEntry:
    state: RequestState
    row_start: int
    row_stop: int
    timestep: torch.Tensor  # the scheduler's own 0-d timestep for this step
    guided: bool  # this step runs classifier-free guidance (two rows per image)


@dataclass
class Batch:
    key: GroupKey
    entries: list[BatchEntry]
    sample: torch.Tensor  # [rows, C, h, w], each request's latents scaled by its scheduler
    timesteps: torch.Tensor  # [rows] float32: exact for integer timesteps, same as the UNet's cast
    encoder_hidden_states: torch.Tensor  # [rows, seq, dim]
    text_embeds: torch.Tensor | None  # [rows, pooled_dim] (SDXL)
    time_ids: torch.Tensor | None  # [rows, 6] (SDXL)
    # per row: (slot, scale) of the LoRAs active now, IP-Adapter branches, hypernetworks
    rows: RowContext
    # (ControlNet model, unit index) -> the row ranges that run it now, their images and scales
    controls: dict[tuple[str, int], list[ControlSegment]] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.sample.shape[0]


def assemble_batch(key: GroupKey, states: list[RequestState]) -> Batch:
    entries: list[BatchEntry] = []
    samples, timesteps, hidden, pooled, time_ids = [], [], [], [], []
    row_stacks: list[list[tuple[int, float]]] = []
    controls: dict[tuple[str, int], list[ControlSegment]] = {}
    ip_rows: list[list] = []
    hypernetwork_rows: list[tuple] = []
    row = 0
    for state in states:
        t = state.timesteps[state.step_index]
        guided = state.guided_at(state.step_index)
        copies = 2 if guided else 1
        keep = state.conditioning_rows(guided)  # outside the guidance interval: the cond rows alone
        latents = state.latents
        x = torch.cat([latents] * copies) if guided else latents  # [rows_i, C, h, w]
        x = state.scheduler.scale_model_input(x, t)
        inpainting = state.inpainting
        if inpainting is not None and inpainting.mode == "concat":
            mask = torch.cat([inpainting.mask] * copies)
            masked = torch.cat([inpainting.masked_image_latents] * copies)
            x = torch.cat([x, mask, masked], dim=1)  # [rows_i, 4 + 1 + 4, h, w]
        samples.append(x)
        rows = x.shape[0]
        timesteps.append(t.to(torch.float32).reshape(1).expand(rows))
        cond = state.conditioning
        hidden.append(cond.encoder_hidden_states[keep])
        if cond.text_embeds is not None:
            pooled.append(cond.text_embeds[keep])
            time_ids.append(cond.time_ids[keep])
        row_stacks.extend([state.stack_at(state.step_index)] * rows)
        hypernetwork_rows.extend([state.request.hypernetworks] * rows)
        for r in range(keep.start, keep.stop):
            ip_rows.append([(b.weights, b.tokens[r], b.scale) for b in state.ip_branches])
        for unit_index, control in enumerate(state.controls):
            unit = control.unit
            if active_at(state.step_index, state.num_steps, unit.start, unit.end):
                cond = torch.cat([control.cond] * copies) if guided else control.cond
                segment = ControlSegment(row, row + rows, cond, unit.scale)
                controls.setdefault((unit.model, unit_index), []).append(segment)
        entries.append(BatchEntry(state=state, row_start=row, row_stop=row + rows, timestep=t, guided=guided))
        row += rows
    return Batch(
        key=key,
        entries=entries,
        sample=torch.cat(samples),
        timesteps=torch.cat(timesteps).to(samples[0].device),
        encoder_hidden_states=torch.cat(hidden),
        text_embeds=torch.cat(pooled) if pooled else None,
        time_ids=torch.cat(time_ids) if time_ids else None,
        rows=RowContext(lora=row_stacks, ip_branches=ip_rows, hypernetworks=hypernetwork_rows),
        controls=controls,
    )

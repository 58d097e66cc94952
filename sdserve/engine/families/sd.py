"""SD 1.x and SD 2.x: one CLIP text encoder, last hidden state, "" for an absent negative prompt.

SD 2.x differs only in its configs (OpenCLIP-H text encoder, linear projections, v-prediction in
the scheduler config), which the loaded modules carry; the math of a request is the same.
"""

from __future__ import annotations

import torch

from sdserve.engine.families.base import ModelFamily, RowConditioning, repeat_rows, run_text_encoder, tokenize
from sdserve.engine.model import LoadedModel


class StableDiffusionFamily(ModelFamily):
    def __init__(self, name: str) -> None:
        self.name = name

    def _embed(self, model: LoadedModel, text: str, embeddings: tuple) -> torch.Tensor:
        tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
        if getattr(encoder.config, "use_attention_mask", False) and not embeddings:
            ids = tokenize(tokenizer, text, tokenizer.model_max_length)  # [1, 77]
            mask = (ids != tokenizer.pad_token_id).long().to(model.device)
            states = encoder(ids.to(model.device), attention_mask=mask)[0]
        else:
            states = run_text_encoder(model, 0, text, tokenizer.model_max_length, embeddings)[0]  # [1, 77, dim]
        return states.to(dtype=model.dtype)

    def encode(
        self, model, prompt, negative_prompt, guidance, num_images, width, height, embeddings=()
    ) -> RowConditioning:
        cond = repeat_rows(self._embed(model, prompt, embeddings), num_images)
        if not guidance:
            return RowConditioning(encoder_hidden_states=cond)
        # SD 1.x/2.x pipelines encode "" for an absent negative prompt.
        uncond = repeat_rows(self._embed(model, negative_prompt or "", embeddings), num_images)
        return RowConditioning(encoder_hidden_states=torch.cat([uncond, cond]))

"""SDXL: two text encoders (penultimate hidden states, concatenated), the second's pooled
projection, and size/crop time ids `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`.

An absent negative prompt uses zero embeddings when the model says `force_zeros_for_empty_prompt`
(as diffusers does); "" is encoded like any other text.
"""

from __future__ import annotations

import torch

from sdserve.engine.families.base import ModelFamily, RowConditioning, repeat_rows, run_text_encoder
from sdserve.engine.model import LoadedModel


class StableDiffusionXLFamily(ModelFamily):
    name = "sdxl"

    def _embed(
        self, model: LoadedModel, text: str, max_length: int | None, embeddings: tuple = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden [1, seq, dim1 + dim2], pooled [1, pooled_dim])."""
        hidden_parts = []
        pooled = None
        for index, tokenizer in enumerate(model.tokenizers):
            length = max_length or tokenizer.model_max_length
            out = run_text_encoder(model, index, text, length, embeddings, output_hidden_states=True)
            # Only the encoder with a projection returns a 2-D first output: the pooled embedding.
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden_parts.append(out.hidden_states[-2])
        assert pooled is not None, "SDXL needs a text encoder with projection"
        hidden = torch.cat(hidden_parts, dim=-1).to(dtype=model.text_encoders[-1].dtype)
        return hidden, pooled

    def encode(
        self, model, prompt, negative_prompt, guidance, num_images, width, height, embeddings=()
    ) -> RowConditioning:
        hidden, pooled = self._embed(model, prompt, None, embeddings)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=hidden.dtype, device=model.device)
        if guidance:
            if negative_prompt is None and model.force_zeros_for_empty_prompt:
                neg_hidden, neg_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
            else:
                neg_hidden, neg_pooled = self._embed(model, negative_prompt or "", hidden.shape[1], embeddings)
            hidden = torch.cat([repeat_rows(neg_hidden, num_images), repeat_rows(hidden, num_images)])
            pooled = torch.cat([repeat_rows(neg_pooled, num_images), repeat_rows(pooled, num_images)])
            rows = 2 * num_images
        else:
            hidden, pooled = repeat_rows(hidden, num_images), repeat_rows(pooled, num_images)
            rows = num_images
        return RowConditioning(
            encoder_hidden_states=hidden.to(model.dtype),
            text_embeds=pooled.to(model.device, model.dtype),
            time_ids=time_ids.repeat(rows, 1).to(model.dtype),
        )

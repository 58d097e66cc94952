"""SDXL: two text encoders (penultimate hidden states, concatenated), the second's pooled
projection, and size/crop time ids `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`.

An absent negative prompt uses zero embeddings when the model says `force_zeros_for_empty_prompt`
(as diffusers does); "" is encoded like any other text.

CLIP skip (A1111's meaning; diffusers' `clip_skip` + 1): `clip_skip = k` reads
`hidden_states[-(k + 1)]` of both encoders, no final layer norm (diffusers' SDXL rule), so 1 is
the penultimate layer SDXL was trained on. The pooled embedding does not change with it.
"""

from __future__ import annotations

import torch

from sdserve.engine.families.base import (
    DEFAULT_TEXT,
    ModelFamily,
    RowConditioning,
    TextOptions,
    encode_a1111,
    pad_to_same_length,
    repeat_rows,
    run_text_encoder,
)
from sdserve.engine.model import LoadedModel
from sdserve.engine.prompt_syntax import A1111
from sdserve.errors import InvalidArgument


def _layer(encoder, out, clip_skip: int) -> torch.Tensor:
    return out.hidden_states[-(clip_skip + 1)]  # [1, seq, dim]


class StableDiffusionXLFamily(ModelFamily):
    name = "sdxl"

    def _embed(
        self, model: LoadedModel, text: str, max_length: int | None, embeddings: tuple = (),
        options: TextOptions = DEFAULT_TEXT,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden [1, seq, dim1 + dim2], pooled [1, pooled_dim])."""
        hidden_parts = []
        pooled = None
        for index, tokenizer in enumerate(model.tokenizers):
            if options.syntax == A1111:
                hidden, first = encode_a1111(model, index, text, embeddings, options.clip_skip, _layer)
            else:
                length = max_length or tokenizer.model_max_length
                out = run_text_encoder(model, index, text, length, embeddings, output_hidden_states=True)
                hidden, first = _layer(model.text_encoders[index], out, options.clip_skip), out[0]
            # Only the encoder with a projection returns a 2-D first output: the pooled embedding.
            if pooled is None and first.ndim == 2:
                pooled = first
            hidden_parts.append(hidden)
        assert pooled is not None, "SDXL needs a text encoder with projection"
        if len({part.shape[1] for part in hidden_parts}) != 1:  # tokenizers that split text differently
            raise InvalidArgument("the model's two tokenizers chunk this prompt differently", field="prompt")
        hidden = torch.cat(hidden_parts, dim=-1).to(dtype=model.text_encoders[-1].dtype)
        return hidden, pooled

    def encode(
        self, model, prompt, negative_prompt, guidance, num_images, width, height, embeddings=(),
        text: TextOptions = DEFAULT_TEXT,
    ) -> RowConditioning:
        hidden, pooled = self._embed(model, prompt, None, embeddings, text)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=hidden.dtype, device=model.device)
        if guidance:
            if negative_prompt is None and model.force_zeros_for_empty_prompt:
                neg_hidden, neg_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
            else:
                # Plain syntax: the negative prompt padded to the prompt's length (77), as diffusers.
                length = None if text.syntax == A1111 else hidden.shape[1]
                neg_hidden, neg_pooled = self._embed(model, negative_prompt or "", length, embeddings, text)
                hidden, neg_hidden = pad_to_same_length(
                    hidden, neg_hidden, lambda: self._embed(model, "", None, embeddings, text)[0])
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

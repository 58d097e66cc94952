"""SD 1.x and SD 2.x: one CLIP text encoder, last hidden state, "" for an absent negative prompt.

SD 2.x differs only in its configs (OpenCLIP-H text encoder, linear projections, v-prediction in
the scheduler config), which the loaded modules carry; the math of a request is the same.

CLIP skip (A1111's `CLIP_stop_at_last_layers`, diffusers' `clip_skip` + 1): `clip_skip = k > 1`
reads `hidden_states[-k]` through the encoder's final layer norm, as both A1111 and diffusers do.
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
    tokenize,
)
from sdserve.engine.model import LoadedModel
from sdserve.engine.prompt_syntax import A1111


def _layer(encoder, out, clip_skip: int) -> torch.Tensor:
    """[1, seq, dim]: the last layer's states (final layer norm applied), or clip_skip - 1 layers earlier."""
    if clip_skip == 1:
        return out[0]
    # transformers 5 flattened CLIPTextModel (no `.text_model`); older versions nest it.
    final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return final_norm(out.hidden_states[-clip_skip])


class StableDiffusionFamily(ModelFamily):
    def __init__(self, name: str) -> None:
        self.name = name

    def _embed(self, model: LoadedModel, text: str, embeddings: tuple, options: TextOptions) -> torch.Tensor:
        if options.syntax == A1111:
            states, _ = encode_a1111(model, 0, text, embeddings, options.clip_skip, _layer)
            return states.to(dtype=model.dtype)
        tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
        # Hidden states only when a layer other than the last is read: the default path stays as it was.
        extra = {"output_hidden_states": True} if options.clip_skip > 1 else {}
        if getattr(encoder.config, "use_attention_mask", False) and not embeddings:
            ids = tokenize(tokenizer, text, tokenizer.model_max_length)  # [1, 77]
            mask = (ids != tokenizer.pad_token_id).long().to(model.device)
            out = encoder(ids.to(model.device), attention_mask=mask, **extra)
        else:
            out = run_text_encoder(model, 0, text, tokenizer.model_max_length, embeddings, **extra)
        return _layer(encoder, out, options.clip_skip).to(dtype=model.dtype)  # [1, 77, dim]

    def encode(
        self, model, prompt, negative_prompt, guidance, num_images, width, height, embeddings=(),
        text: TextOptions = DEFAULT_TEXT,
    ) -> RowConditioning:
        embedded = self._embed(model, prompt, embeddings, text)
        if not guidance:
            return RowConditioning(encoder_hidden_states=repeat_rows(embedded, num_images))
        # SD 1.x/2.x pipelines encode "" for an absent negative prompt.
        negative = self._embed(model, negative_prompt or "", embeddings, text)
        embedded, negative = pad_to_same_length(embedded, negative, lambda: self._embed(model, "", embeddings, text))
        cond, uncond = repeat_rows(embedded, num_images), repeat_rows(negative, num_images)
        return RowConditioning(encoder_hidden_states=torch.cat([uncond, cond]))

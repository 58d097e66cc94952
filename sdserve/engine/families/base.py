"""What a model family contributes to a request: its text conditioning, row by row.

Every family turns (prompt, negative prompt) into the tensors one request's UNet rows read.
Rows follow diffusers' order: under classifier-free guidance the unconditional rows come first
(`[uncond × n, cond × n]`), otherwise only the conditional rows (`[cond × n]`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from sdserve.engine.model import LoadedModel


@dataclass
class RowConditioning:
    """A request's per-row UNet inputs besides the latents and the timestep."""

    encoder_hidden_states: torch.Tensor  # [rows, seq, dim]
    text_embeds: torch.Tensor | None = None  # [rows, pooled_dim] (SDXL)
    time_ids: torch.Tensor | None = None  # [rows, 6] (SDXL)


class ModelFamily(ABC):
    name: str

    @abstractmethod
    def encode(
        self,
        model: LoadedModel,
        prompt: str,
        negative_prompt: str | None,
        guidance: bool,
        num_images: int,
        width: int,
        height: int,
        embeddings: tuple = (),
    ) -> RowConditioning:
        """The request's rows of conditioning, `2 * num_images` rows under guidance, else `num_images`."""


def tokenize(tokenizer, text: str, max_length: int) -> torch.Tensor:
    """CLIP token ids padded to `max_length`, truncated as diffusers truncates: [1, max_length]."""
    return tokenizer(
        text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


COMPONENTS = ("text_encoder", "text_encoder_2")


def run_text_encoder(model: LoadedModel, index: int, text: str, max_length: int, embeddings=(), **kwargs):
    """Tokenize `text` for encoder `index` and run it, with the request's textual-inversion tokens.

    The shared tokenizer and token table are never changed: the request's vectors are rows past
    the vocabulary that the wrapped token table (ExtraRowsEmbedding) reads from the call's row
    context, which the caller sets (`state.prepare_state`: the request's textual inversions).
    """
    tokenizer, encoder = model.tokenizers[index], model.text_encoders[index]
    component = COMPONENTS[index]
    usable = [e for e in embeddings if component in e.vectors]
    if not usable:
        return encoder(tokenize(tokenizer, text, max_length).to(model.device), **kwargs)
    from sdserve.adapters.embeddings import tokenize_with_embeddings

    tokens = tokenize_with_embeddings(tokenizer, text, usable, component=component, max_length=max_length)
    return encoder(tokens.input_ids.to(model.device), **kwargs)


def repeat_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """[1, ...] -> [n, ...], each image of a request reading the same embedding."""
    return x.repeat(n, *([1] * (x.dim() - 1)))

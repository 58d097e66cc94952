"""What a model family contributes to a request: its text conditioning, row by row.

Every family turns (prompt, negative prompt) into the tensors one request's UNet rows read.
Rows follow diffusers' order: under classifier-free guidance the unconditional rows come first
(`[uncond × n, cond × n]`), otherwise only the conditional rows (`[cond × n]`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdserve.engine.model import LoadedModel
from sdserve.engine.prompt_syntax import MAX_CHUNKS, PLAIN, apply_emphasis, make_chunks, parse_attention
from sdserve.errors import InvalidArgument


@dataclass(frozen=True)
class TextOptions:
    """How a request's prompts become text states (the request's `prompt_syntax` and `clip_skip`)."""

    syntax: str = PLAIN  # "plain" | "a1111" (engine/prompt_syntax.py)
    clip_skip: int = 1  # A1111's meaning: 1 = the layer the family reads natively, 2 = the one before, ...


DEFAULT_TEXT = TextOptions()


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
        text: TextOptions = DEFAULT_TEXT,
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


# (encoder, its output with hidden states, clip_skip) -> the hidden states the family reads [1, seq, dim]
LayerOf = Callable[[torch.nn.Module, object, int], torch.Tensor]


def _piece_ids(model: LoadedModel, index: int, piece: str, embeddings) -> list[int]:
    """One weighted piece's token ids, no BOS/EOS (A1111 tokenizes pieces one by one)."""
    tokenizer = model.tokenizers[index]
    component = COMPONENTS[index]
    usable = [e for e in embeddings if component in e.vectors]
    if not usable:
        return list(tokenizer(piece, add_special_tokens=False).input_ids)
    from sdserve.adapters.embeddings import tokenize_with_embeddings

    # Longer than every prompt this syntax accepts: a piece that fills it is refused below.
    room = 2 * MAX_CHUNKS * 75
    tokens = tokenize_with_embeddings(tokenizer, piece, usable, component=component, max_length=room + 2)
    return tokens.input_ids[0, 1 : 1 + tokens.length].tolist()


def encode_a1111(
    model: LoadedModel, index: int, text: str, embeddings, clip_skip: int, layer: LayerOf
) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's weighted, chunked encoding of `text` by encoder `index` (engine/prompt_syntax.py).

    -> (hidden [1, (size + 2) * chunks, dim] (77 per chunk for CLIP), the first chunk's first
    output: [1, pooled_dim] for an encoder with projection, which SDXL takes as its pooled
    embedding, unweighted, as A1111)."""
    tokenizer, encoder = model.tokenizers[index], model.text_encoders[index]
    pieces = [(None if piece is None else _piece_ids(model, index, piece, embeddings), weight)
              for piece, weight in parse_attention(text)]
    comma = tokenizer.get_vocab().get(",</w>")
    size = tokenizer.model_max_length - 2  # A1111's 75 for CLIP's 77 positions; BOS and EOS take 2
    chunks = make_chunks(pieces, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                         pad=tokenizer.pad_token_id, comma=comma, size=size)
    if len(chunks) > MAX_CHUNKS:
        raise InvalidArgument(
            f"needs {len(chunks)} chunks of {size} tokens; at most {MAX_CHUNKS} ({MAX_CHUNKS * size} tokens)",
            field="prompt")
    if len(chunks) > 1 and model.info.backend != "eager":
        # Compiled UNet graphs are exported for one chunk's text tokens (compile/onnx_graphs.py).
        raise InvalidArgument(
            f"needs {len(chunks)} chunks of {size} tokens; model {model.info.name!r} is compiled "
            f"({model.info.backend}) for one", field="prompt")
    states, first = [], None
    for chunk in chunks:
        ids = torch.tensor([chunk.ids], dtype=torch.long, device=model.device)  # [1, size + 2]
        out = encoder(ids, output_hidden_states=True)
        first = out[0] if first is None else first
        weights = torch.tensor(chunk.weights, dtype=torch.float32, device=model.device)  # [size + 2]
        states.append(apply_emphasis(layer(encoder, out, clip_skip), weights))  # [1, size + 2, dim]
    return torch.cat(states, dim=1), first


def pad_to_same_length(cond: torch.Tensor, uncond: torch.Tensor, empty: Callable[[], torch.Tensor]):
    """A1111's `pad_cond_uncond`: the shorter of [1, 77 k, dim] and [1, 77 m, dim] grows by the
    encoded empty prompt (`empty()`, [1, 77, dim]) repeated, so the request's rows share a UNet call."""
    if cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    blank = empty()
    repeats = abs(cond.shape[1] - uncond.shape[1]) // blank.shape[1]
    grow = blank.repeat(1, repeats, 1)
    if cond.shape[1] < uncond.shape[1]:
        return torch.cat([cond, grow], dim=1), uncond
    return cond, torch.cat([uncond, grow], dim=1)

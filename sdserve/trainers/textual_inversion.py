"""Textual inversion: new token rows in the text encoders' token tables, trained by the shared loop.

A new word (`--token "<teal>"`) is added, as diffusers' `load_textual_inversion` adds it, to a
COPY of each tokenizer: the token, then `token_1 ... token_{K-1}` for K vectors, with ids
`len(tokenizer) + k`. Each text encoder's token table is wrapped (explicitly, and put back by
`remove()`) in `adapters.embeddings.ExtraRowsEmbedding`, the module the server reads request
rows through: ids below `len(tokenizer)` read the frozen table, ids from there up read the K
trainable vectors `[K, dim]`. Nothing else trains; the table itself and every base weight stay
byte-identical, and the shared tokenizers are never changed.

Captions go through diffusers' multi-vector rewrite ("a <teal> circle" ->
"a <teal> <teal>_1 <teal>_2 circle", `maybe_convert_prompt`) before tokenizing, so the training
forward conditions the UNet exactly as diffusers and sdserve will when they load the file.

Initialisation: every vector starts as the `--init-token` word's token-table row. A word that the
tokenizer splits into several tokens (the embedded default model's tiny vocabulary spells most
words letter by letter) starts from the mean of their rows: a centroid of the word's pieces stays
inside the region of the table the encoder was trained on, where a refusal would make most words
unusable with small vocabularies. Each text encoder (SDXL has two) is initialised from its own
tokenizer and table.

Output: diffusers' `learned_embeds.safetensors` layout `{token: [K, dim]}` for one text encoder,
sdserve's SDXL layout `{"clip_l": [K, dim_1], "clip_g": [K, dim_2]}` for two (what
`adapters.embeddings.load_embedding` reads; diffusers loads each half with
`load_textual_inversion(tensor, token=..., text_encoder=..., tokenizer=...)`), with the loop's
provenance and the token in the safetensors metadata.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdserve.adapters.embeddings import MAX_VECTORS, ExtraRowsEmbedding, TokenRows, expand_prompt
from sdserve.adapters.formats.common import short
from sdserve.errors import InvalidArgument
from sdserve.trainers.components import Components, Conditioning
from sdserve.trainers.data import CaptionedImages
from sdserve.trainers.loop import restore_state
from sdserve.trainers.output import safetensors_bytes

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
SDXL_KEYS = ("clip_l", "clip_g")  # the SDXL layout's key of each text encoder's vectors
MAX_TOKEN_CHARS = 100  # what adapters.embeddings accepts


@dataclass(frozen=True)
class TextualInversionConfig:
    """The embedding's shape; the `sdserve train textual-inversion` flags mirror these fields."""

    token: str
    """The new word prompts call the embedding by, e.g. "<teal>"; it must be new to the vocabulary."""
    init_token: str
    """A word whose token-table row (mean of rows, if it is several tokens) every vector starts from."""
    num_vectors: int = 1
    """K: vectors the token stands for (it takes K of the prompt's 75 token positions)."""

    @property
    def tokens(self) -> tuple[str, ...]:
        """What is added to the tokenizer, as diffusers adds it: token, token_1 ... token_{K-1}."""
        return (self.token,) + tuple(f"{self.token}_{i}" for i in range(1, self.num_vectors))


def check_config(config: TextualInversionConfig) -> None:
    """One-line errors naming the flag, before any model is loaded."""
    token = config.token
    if not token or any(ch.isspace() for ch in token) or not token.isprintable():
        raise InvalidArgument(f"must be one word without spaces (got {short(token, 60)!r})", field="--token")
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument(f"must be at most {MAX_TOKEN_CHARS} characters", field="--token")
    if not config.init_token.strip():
        raise InvalidArgument("must be a word (got an empty one)", field="--init-token")
    if not 1 <= config.num_vectors <= MAX_VECTORS:
        raise InvalidArgument(f"must be between 1 and {MAX_VECTORS}, the prompt positions CLIP has "
                              f"besides BOS and EOS (got {config.num_vectors})", field="--num-vectors")


def _check_new(tokenizer: Any, tokens: Sequence[str]) -> None:
    """Refuse a token the vocabulary already has (diffusers refuses it on load), or a whole word
    of it ("blue" would be one as "blue</w>"; adding it would take that word over in every prompt),
    or one the tokenizer's normalizer changes (CLIP lowercases prompts before matching)."""
    vocabulary = tokenizer.get_vocab()
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    for added in tokens:
        if added in vocabulary or f"{added}</w>" in vocabulary or added == tokenizer.unk_token:
            raise InvalidArgument(f"{short(added, 60)!r} is already in the model's vocabulary; choose a new "
                                  f"word such as <{short(added, 60)}>", field="--token")
        if normalizer is not None and normalizer.normalize_str(added) != added:
            raise InvalidArgument(f"{short(added, 60)!r} changes under the tokenizer's normalization (CLIP "
                                  f"lowercases prompts); use {normalizer.normalize_str(added)!r}", field="--token")


def _init_row(tokenizer: Any, table: torch.Tensor, word: str) -> torch.Tensor:
    """The mean of `word`'s token rows in `table` [vocab, dim] -> [dim]."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise InvalidArgument(f"{short(word, 60)!r} tokenizes to nothing", field="--init-token")
    if tokenizer.unk_token_id in ids:
        raise InvalidArgument(f"{short(word, 60)!r} has characters the tokenizer does not know",
                              field="--init-token")
    return table[torch.tensor(ids)].mean(dim=0)  # [dim]


class TextualInversionMethod:
    """The textual-inversion method for `loop.train`: wraps each text encoder's token table in
    place (`remove()` puts the tables back)."""

    kind = "textual_inversion"

    def __init__(self, components: Components, config: TextualInversionConfig) -> None:
        check_config(config)
        if len(components.text_encoders) > len(TEXT_ENCODERS):
            raise InvalidArgument(f"{components.family} models have {len(components.text_encoders)} text encoders; "
                                  "textual inversion supports one (SD 1.x/2.x) or two (SDXL)", field="--model")
        self.components, self.config = components, config
        tokenizers: list[Any] = []
        self.vectors: list[nn.Parameter] = []  # per text encoder [K, dim]
        self.first_ids: list[int] = []  # per text encoder: the id of vector 0 (len of the shared tokenizer)
        self._tables: list[nn.Module] = []  # the wrapped base tables, for remove()
        for index, (tokenizer, encoder) in enumerate(zip(components.tokenizers, components.text_encoders)):
            _check_new(tokenizer, config.tokens)
            table = encoder.get_input_embeddings()  # nn.Embedding [vocab, dim]
            start = _init_row(tokenizer, table.weight.detach(), config.init_token)  # [dim]
            extended = copy.deepcopy(tokenizer)
            extended.add_tokens(list(config.tokens))
            first_id = len(tokenizer)
            ids = extended.convert_tokens_to_ids(list(config.tokens))
            if ids != list(range(first_id, first_id + config.num_vectors)) or \
                    extended.tokenize(" ".join(config.tokens)) != list(config.tokens):
                raise InvalidArgument(f"{short(config.token, 60)!r} does not tokenize as one new word",
                                      field="--token")
            tokenizers.append(extended)
            self.first_ids.append(first_id)
            self.vectors.append(nn.Parameter(start.repeat(config.num_vectors, 1).clone()))  # [K, dim]
            self._tables.append(table)
            encoder.set_input_embeddings(ExtraRowsEmbedding(table, partial(self._rows, index)))
        self.tokenizers = tokenizers
        # The base model with the extended tokenizers: its encode_text runs the wrapped encoders.
        self._encoding = dataclasses.replace(components, tokenizers=tokenizers)

    def _rows(self, index: int) -> TokenRows:
        return self.first_ids[index], self.vectors[index]

    def remove(self) -> None:
        """Put the base token tables back (the components are the base model again)."""
        for encoder, table in zip(self.components.text_encoders, self._tables):
            encoder.set_input_embeddings(table)

    def expand(self, caption: str) -> str:
        """diffusers' `maybe_convert_prompt`: when the caption tokenizes to the token, every
        occurrence of it becomes "token token_1 ... token_{K-1}"."""
        if self.config.num_vectors > 1 and self.config.token in self.tokenizers[0].tokenize(caption):
            return expand_prompt(caption, self.config.token, self.config.num_vectors)
        return caption

    def encode_text(self, captions: Sequence[str], resolution: int | None = None) -> Conditioning:
        """The UNet's conditioning for `captions` with the current vectors: the training forward."""
        return self._encoding.encode_text([self.expand(c) for c in captions], resolution)

    def check_data(self, data: CaptionedImages) -> None:
        """Every --data caption must hold the token, and all K of its vectors must fit within
        the text encoder's length (an image whose caption lacks it would train nothing)."""
        wanted = set(range(self.first_ids[0], self.first_ids[0] + self.config.num_vectors))
        ids = self._encoding.tokenize([self.expand(c) for c in data.captions])  # [N, 77]
        for caption, file, row in zip(data.captions, data.files, ids.tolist()):
            where = str(data.root / file)
            if self.config.token not in caption:
                raise InvalidArgument(f"caption {short(caption, 80)!r} does not contain the token "
                                      f"{self.config.token!r} (--token); name it in every caption, e.g. "
                                      f"'a photo of {self.config.token}'", field=where)
            if not wanted <= set(row):
                raise InvalidArgument(f"the token {self.config.token!r} falls past the text encoder's "
                                      f"{len(row)}-token limit; move it nearer the caption's start", field=where)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.vectors)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        side = noisy.shape[-1] * self.components.vae_scale_factor
        return self.components.predict(noisy, timesteps, self.encode_text(captions, resolution=side))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {component: vectors.detach() for component, vectors in zip(TEXT_ENCODERS, self.vectors)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        restore_state(self.state_dict(), state, "text encoders")

    def metadata(self) -> dict[str, str]:
        return {
            "sdserve_token": self.config.token,
            "sdserve_num_vectors": str(self.config.num_vectors),
            "sdserve_init_token": self.config.init_token,
            "sdserve_trigger_tokens": self.config.token,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors: {token: [K, dim]}, or {"clip_l": [K, dim_1], "clip_g": [K, dim_2]}."""
        vectors = [v.detach().clone().contiguous() for v in self.vectors]
        if len(vectors) == 1:
            return {self.config.token: vectors[0]}
        return dict(zip(SDXL_KEYS, vectors))

    def write(self, out: Path, metadata: dict[str, str]) -> None:
        layout = "diffusers" if len(self.vectors) == 1 else "sdxl"
        out.write_bytes(safetensors_bytes(self.tensors(), {**metadata, "sdserve_format": layout}))

"""Textual-inversion embeddings: file layouts, checks, and per-request tokenization.

Layouts (safetensors only; A1111 `.pt` files are converted offline by `sdserve adapters convert`):

    diffusers   {token: [n, dim]} (or [dim]), one key; the key is the token
    kohya/A1111 {"emb_params": [n, dim]}; the token is the caller's name for the file
    SDXL        {"clip_l": [n, dim_1], "clip_g": [n, dim_2]}; token as for kohya

`clip_l` feeds `text_encoder` and `clip_g` feeds `text_encoder_2`; the other layouts feed
`text_encoder`. Every vector must have the width of the text encoder it feeds.

How diffusers uses an embedding (the oracle): `load_textual_inversion` adds the token, and for
n > 1 vectors also `token_1 ... token_{n-1}`, to the tokenizer (ids `len(tokenizer) + k`, in load
order) and the vectors as rows of the text encoder's token table. Before tokenizing, the pipeline's
`maybe_convert_prompt` tokenizes the prompt and, for every matched added token whose matched text
equals the token exactly, replaces each occurrence of the token in the prompt by
`"token token_1 ... token_{n-1}"` (`expand_prompt`). Added tokens are matched leftmost-longest in
the normalized prompt (CLIP lowercases) before BPE, anywhere in a word; the text between matches is
tokenized piece by piece.

`tokenize_with_embeddings` reproduces that without touching the shared tokenizer: it splits the
prompt on the request's tokens itself, tokenizes only the plain pieces with the shared tokenizer,
and gives each embedding vector the id diffusers would give it. Ids `>= first_extra_id` are rows of
`extra_rows`; `embed_tokens` / `ExtraRowsEmbedding` look them up there instead of in the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn

from sdserve.adapters.formats.common import short
from sdserve.adapters.reader import Source, read_safetensors
from sdserve.errors import AdapterError, InvalidArgument

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
MAX_VECTORS = 75  # a CLIP prompt holds 77 tokens, two of them BOS and EOS
EmbeddingLayout = Literal["diffusers", "kohya", "sdxl"]

_SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
_KOHYA_KEY = "emb_params"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LORA_MARKERS = ("lora_", ".lora", "hypernetwork.")


@dataclass(frozen=True)
class TextualInversion:
    """A validated embedding: the same number of vectors for every text encoder it feeds."""

    name: str
    token: str
    vectors: Mapping[str, torch.Tensor] = field(repr=False)  # component -> [n, dim]
    layout: EmbeddingLayout
    kind: Literal["embedding"] = "embedding"

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def tokens(self) -> tuple[str, ...]:
        """The tokens diffusers adds for it: `token`, then `token_1 ... token_{n-1}`."""
        return (self.token,) + tuple(f"{self.token}_{i}" for i in range(1, self.num_vectors))

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.vectors.values())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextualInversion:
        vectors = {c: v.to(device=device, dtype=dtype) for c, v in self.vectors.items()}
        return TextualInversion(self.name, self.token, MappingProxyType(vectors), self.layout)


def _check_token(name: str, token: str) -> None:
    if not token or any(ch.isspace() for ch in token) or not token.isprintable():
        raise AdapterError(name, f"token {short(token, 60)!r} must be a non-empty word without spaces")
    if len(token) > 100:
        raise AdapterError(name, "token is longer than 100 characters")


def _layout_of(name: str, keys: set[str]) -> EmbeddingLayout:
    if keys and keys <= set(_SDXL_KEYS):
        return "sdxl"
    if keys == {_KOHYA_KEY}:
        return "kohya"
    if any(marker in key for key in keys for marker in _LORA_MARKERS):
        raise AdapterError(name, "not a textual-inversion embedding (it holds LoRA or hypernetwork weights)")
    if len(keys) == 1:
        return "diffusers"
    raise AdapterError(
        name, "not a textual-inversion embedding (expected one token key, 'emb_params', or 'clip_l'/'clip_g')"
    )


def load_embedding(
    source: Source,
    name: str,
    widths: Mapping[str, int],
    *,
    token: str | None = None,
    max_vectors: int = MAX_VECTORS,
    dtype: torch.dtype = torch.float32,
) -> TextualInversion:
    """Read and check an embedding file (path or bytes) against a model's text encoders.

    `widths` maps each text encoder of the model to its hidden size, e.g.
    `{"text_encoder": 768, "text_encoder_2": 1280}`. `token` overrides the file's token (as
    diffusers' `token=` does); kohya and SDXL files have none, so `name` is used (A1111's rule).
    Raises AdapterError, nothing else, for any problem with the file.
    """
    raw = read_safetensors(source, name)
    layout = _layout_of(name, set(raw.tensors))
    if layout == "diffusers":
        ((file_token, tensor),) = raw.tensors.items()
        by_component = {"text_encoder": (file_token, tensor)}
    elif layout == "kohya":
        file_token = name
        by_component = {"text_encoder": (_KOHYA_KEY, raw.tensors[_KOHYA_KEY])}
    else:
        file_token = name
        by_component = {_SDXL_KEYS[key]: (key, tensor) for key, tensor in sorted(raw.tensors.items())}
    token = file_token if token is None else token
    _check_token(name, token)

    vectors: dict[str, torch.Tensor] = {}
    for component, (key, tensor) in by_component.items():
        where = f"tensor {short(key, 60)!r}"
        if component not in widths:
            raise AdapterError(name, f"{where} is for {component}, which this model does not have")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise AdapterError(name, f"{where} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                                     "expected a floating-point type")
        if tensor.ndim == 1:
            tensor = tensor.unsqueeze(0)  # [dim] -> [1, dim]: diffusers accepts a single vector
        if tensor.ndim != 2 or tensor.shape[0] < 1:
            raise AdapterError(name, f"{where} has shape {list(tensor.shape)}, expected [vectors, width]")
        if tensor.shape[1] != widths[component]:
            raise AdapterError(name, f"{where} has width {tensor.shape[1]}, the model's {component} "
                                     f"expects width {widths[component]}")
        if tensor.shape[0] > max_vectors:
            raise AdapterError(name, f"{where} has {tensor.shape[0]} vectors, at most {max_vectors} are allowed")
        converted = tensor.to(dtype).contiguous()  # [n, dim]
        if not bool(torch.isfinite(converted).all()):
            raise AdapterError(name, f"{where} contains NaN or infinite values")
        vectors[component] = converted
    counts = {v.shape[0] for v in vectors.values()}
    if len(counts) != 1:
        raise AdapterError(name, "clip_l and clip_g hold different numbers of vectors")
    return TextualInversion(name=name, token=token, vectors=MappingProxyType(vectors), layout=layout)


def expand_prompt(prompt: str, token: str, n: int) -> str:
    """diffusers' multi-vector rewrite: every occurrence of `token` (a plain substring replace,
    as diffusers does) becomes "token token_1 ... token_{n-1}"."""
    if n <= 1:
        return prompt
    return prompt.replace(token, " ".join([token] + [f"{token}_{i}" for i in range(1, n)]))


def _normalizer(tokenizer: Any) -> Callable[[str], str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError("tokenize_with_embeddings needs a tokenizers-backed (fast) CLIP tokenizer")
    normalizer = backend.normalizer
    return (lambda text: text) if normalizer is None else normalizer.normalize_str


def _split(text: str, matchers: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Split normalized `text` into (piece, token or None), matching the normalized forms in
    `matchers` (normalized form -> token) leftmost-longest, as the tokenizers library does."""
    if not matchers:
        return [(text, None)]
    by_length = sorted(matchers, key=len, reverse=True)
    pieces: list[tuple[str, str | None]] = []
    start = i = 0
    while i < len(text):
        found = next((form for form in by_length if text.startswith(form, i)), None)
        if found is None:
            i += 1
            continue
        if i > start:
            pieces.append((text[start:i], None))
        pieces.append((found, matchers[found]))
        i += len(found)
        start = i
    if start < len(text):
        pieces.append((text[start:], None))
    return pieces


def placeholder_token_ids(
    tokenizer: Any, embeddings: Sequence[TextualInversion], component: str = "text_encoder"
) -> dict[str, int]:
    """The id diffusers gives each added token after `load_textual_inversion(embeddings in this
    order)`: `len(tokenizer)` upwards, vector by vector. Embeddings without vectors for
    `component` are not loaded into that encoder and take no ids. Refuses what diffusers refuses:
    a token already in the vocabulary, or two embeddings with clashing tokens."""
    normalize = _normalizer(tokenizer)
    ids: dict[str, int] = {}
    forms: set[str] = set()
    next_id = len(tokenizer)
    unk_id = tokenizer.unk_token_id
    for embedding in embeddings:
        if component not in embedding.vectors:
            continue
        for added in embedding.tokens:
            known = tokenizer.convert_tokens_to_ids(added)
            if (known is not None and known != unk_id) or added == tokenizer.unk_token:
                raise AdapterError(embedding.name, f"token {short(added, 60)!r} is already in the model's vocabulary")
            form = normalize(added)
            if added in ids or form in forms:
                raise InvalidArgument(f"two embeddings use the token {short(added, 60)!r}", field="adapters")
            ids[added] = next_id
            forms.add(form)
            next_id += 1
    return ids


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt tokenized as diffusers would after loading the request's embeddings."""

    input_ids: torch.Tensor  # [1, max_length] int64; ids >= first_extra_id are embedding vectors
    overrides: Mapping[int, tuple[int, int]]  # position -> (index into embeddings, vector index)
    first_extra_id: int  # len(tokenizer): the id of row 0 of extra_rows
    extra_rows: torch.Tensor  # [n_extra, dim] vectors of the loaded embeddings, in id order
    prompt: str  # the prompt after the multi-vector rewrite
    length: int = 0  # tokens of the prompt kept (BOS, EOS and padding not counted)


def tokenize_with_embeddings(
    tokenizer: Any,
    prompt: str,
    embeddings: Sequence[TextualInversion],
    *,
    component: str = "text_encoder",
    max_length: int | None = None,
) -> TokenizedPrompt:
    """Tokenize `prompt` with the shared `tokenizer` (never modified) as diffusers' pipeline does
    after `load_textual_inversion` of `embeddings` in this order into `component`'s tokenizer:
    multi-vector rewrite, added-token split, BPE on the rest, truncation, BOS/EOS, padding."""
    max_length = tokenizer.model_max_length if max_length is None else max_length
    ids_of = placeholder_token_ids(tokenizer, embeddings, component)
    normalize = _normalizer(tokenizer)
    matchers = {normalize(added): added for added in ids_of}
    owner: dict[str, tuple[int, int]] = {}
    for index, embedding in enumerate(embeddings):
        if component in embedding.vectors:
            owner.update({added: (index, k) for k, added in enumerate(embedding.tokens)})

    # diffusers tokenizes once, then rewrites every matched token whose matched (normalized)
    # text is exactly the token; tokens that normalization changes (upper case) are not expanded.
    matched = [added for _, added in _split(normalize(prompt), matchers) if added is not None]
    for added in dict.fromkeys(matched):
        index, vector = owner[added]
        if vector == 0 and normalize(added) == added:
            prompt = expand_prompt(prompt, added, embeddings[index].num_vectors)

    pieces = _split(normalize(prompt), matchers)
    plain = [piece for piece, added in pieces if added is None]
    plain_ids = iter(tokenizer(plain, add_special_tokens=False).input_ids if plain else [])
    content: list[int] = []
    sources: list[tuple[int, int] | None] = []
    for _piece, added in pieces:
        if added is None:
            piece_ids = next(plain_ids)
            content += piece_ids
            sources += [None] * len(piece_ids)
        else:
            content.append(ids_of[added])
            sources.append(owner[added])
    keep = max_length - 2
    ids = [tokenizer.bos_token_id] + content[:keep] + [tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (max_length - len(ids))
    overrides = {pos + 1: src for pos, src in enumerate(sources[:keep]) if src is not None}
    return TokenizedPrompt(
        input_ids=torch.tensor([ids], dtype=torch.long),
        overrides=MappingProxyType(overrides),
        first_extra_id=len(tokenizer),
        extra_rows=extra_rows_of(embeddings, component),
        prompt=prompt,
        length=len(content[:keep]),
    )


def extra_rows_of(embeddings: Sequence[TextualInversion], component: str) -> torch.Tensor:
    """[n_extra, dim]: the vectors of `embeddings` that feed `component`, in the order of the ids
    `tokenize_with_embeddings` gives them (row k is id `first_extra_id + k`); [0, 0] for none."""
    rows = [e.vectors[component] for e in embeddings if component in e.vectors]
    return torch.cat(rows) if rows else torch.empty(0, 0)


def embed_tokens(
    weight: torch.Tensor, input_ids: torch.Tensor, first_extra_id: int, extra_rows: torch.Tensor
) -> torch.Tensor:
    """Token embeddings with per-request rows: `weight[id]` for vocabulary ids, and
    `extra_rows[b, id - first_extra_id]` (or `extra_rows[id - first_extra_id]`) for the rest.

    weight [vocab, dim]; input_ids [batch, seq]; extra_rows [n_extra, dim] or [batch, n_extra, dim].
    Returns [batch, seq, dim] in weight's dtype.
    """
    is_extra = input_ids >= first_extra_id  # [batch, seq]
    base = nn.functional.embedding(input_ids.clamp(max=weight.shape[0] - 1), weight)  # [batch, seq, dim]
    if extra_rows.numel() == 0 or not bool(is_extra.any()):
        return base
    offsets = (input_ids - first_extra_id).clamp(min=0)  # [batch, seq]
    if extra_rows.ndim == 2:
        extra = extra_rows[offsets]  # [batch, seq, dim]
    else:
        extra = extra_rows[torch.arange(input_ids.shape[0], device=input_ids.device)[:, None], offsets]
    return torch.where(is_extra[..., None], extra.to(base.dtype), base)


TokenRows = tuple[int, torch.Tensor]  # (first_extra_id, extra_rows [n_extra, dim] or [batch, n_extra, dim])


class ExtraRowsEmbedding(nn.Module):
    """Wraps a text encoder's token table (explicitly, once, at model load) so that ids past the
    vocabulary read the current call's rows; when there are none it is the plain table. The shared
    weights and tokenizer are never changed.

    `rows` says where the current call's rows come from, and is given at wrap time: the engine
    passes its row context's reader (`RowContextHolder.token_rows`).
    """

    def __init__(self, base: nn.Embedding, rows: Callable[[], TokenRows | None]) -> None:
        super().__init__()
        self.base = base
        self.rows = rows

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        current = self.rows()
        if current is None:
            return self.base(input_ids)
        first_extra_id, rows = current
        return embed_tokens(self.base.weight, input_ids, first_extra_id, rows.to(self.base.weight.device))

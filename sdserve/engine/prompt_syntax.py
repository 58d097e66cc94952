"""AUTOMATIC1111's prompt syntax (`prompt_syntax: "a1111"`): attention weights, BREAK, chunks, <lora:> tags.

Transcribed from stable-diffusion-webui 1.x (`modules/prompt_parser.py::parse_prompt_attention`,
`modules/sd_hijack_clip.py::tokenize_line`, `modules/sd_emphasis.py::EmphasisOriginal`,
`modules/extra_networks.py::parse_prompt`), with A1111's default settings (comma padding
backtrack 20, emphasis "Original"):

- `(text)` multiplies the weight of `text` by 1.1, `[text]` by 1/1.1, `(text:1.3)` by 1.3; nesting
  multiplies; unbalanced brackets close at the end; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal.
- Pieces are tokenized one by one (no BOS/EOS) and packed into chunks of 75 tokens; `BREAK` ends a
  chunk; a full chunk whose last comma is within 20 tokens of its end moves the tokens after
  that comma to the next chunk. Each chunk is `[BOS] text [EOS] pad...`, 77 ids. (A text encoder
  with fewer positions, as the built-in `default` model's 40, takes chunks of its length - 2.)
- Each chunk is encoded alone; its hidden states `z` [1, 77, dim] are weighted per token and
  rescaled to keep their mean: `z' = z * w; z' *= mean(z) / mean(z')` (mean over every element);
  the chunks are concatenated along the sequence. SDXL's pooled embedding is the first chunk's.

One deliberate difference: A1111 marks BREAK with the weight -1, so a BREAK inside brackets gets
another weight and is encoded as the word "BREAK"; here BREAK always breaks.

This module is plain Python except `apply_emphasis` (torch); `families/base.py` runs the encoders.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from sdserve.errors import InvalidArgument

PLAIN = "plain"
A1111 = "a1111"
SYNTAXES = (PLAIN, A1111)

CHUNK_TOKENS = 75  # tokens of text per chunk; BOS and EOS make it CLIP's 77 (a shorter encoder: its length - 2)
COMMA_BACKTRACK = 20  # A1111's `comma_padding_backtrack` default
MAX_CHUNKS = 8  # 600 tokens: bounds a request's text-encoder calls and cross-attention length
BREAK = None  # a piece that ends the chunk (the parser's marker; it carries no weight)

ROUND = 1.1
SQUARE = 1 / 1.1

_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes, and a lone backslash (literal)
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|       # (text:1.3)
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
# A1111's extra-network tag: <kind:arguments>; kind "lora" goes into the adapter stack.
_TAG = re.compile(r"<(\w+):([^>]+)>")


def check_syntax(value: str) -> str:
    if value not in SYNTAXES:
        raise InvalidArgument(f"must be one of {', '.join(SYNTAXES)} (got {value[:32]!r})", field="prompt_syntax")
    return value


def parse_attention(text: str) -> list[tuple[str | None, float]]:
    """Text -> [(piece, weight)], runs of equal weight merged; a BREAK is `(None, 1.0)`.

    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text | BREAK, weight]
    round_open: list[int] = []  # where each unclosed "(" began in `pieces`
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[0] is not BREAK:
                piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:  # "(a:1.2.3)": the regex takes digits and dots; A1111 raises here too
                raise InvalidArgument(f"the weight in '(...:{weight[:16]})' is not a number", field="prompt") from None
            multiply(round_open.pop(), factor)
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index > 0:
                    pieces.append([BREAK, 1.0])
                pieces.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    if not pieces:
        pieces = [["", 1.0]]
    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        last = merged[-1]
        if piece[0] is not BREAK and last[0] is not BREAK and piece[1] == last[1]:
            last[0] += piece[0]
        else:
            merged.append(piece)
    return [(piece, weight) for piece, weight in merged]


@dataclass(frozen=True)
class LoraTag:
    name: str
    scale: float


def extract_lora_tags(prompt: str) -> tuple[str, tuple[LoraTag, ...]]:
    """`<lora:NAME>` / `<lora:NAME:SCALE>` tags out of a prompt -> (the prompt without them, tags).

    As A1111, the tag is removed from the text and the scale defaults to 1.0. A1111's third
    argument (a separate UNet multiplier) and other tag kinds are refused rather than ignored."""
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        kind, arguments = match.group(1), match.group(2).split(":")
        shown = match.group(0)[:80]
        if kind != "lora":
            raise InvalidArgument(f"tag {shown!r}: only <lora:NAME:scale> tags are served", field="prompt")
        if len(arguments) > 2 or not arguments[0].strip():
            raise InvalidArgument(f"tag {shown!r} must be <lora:NAME> or <lora:NAME:scale>", field="prompt")
        scale = 1.0
        if len(arguments) == 2:
            try:
                scale = float(arguments[1])
            except ValueError:
                scale = math.nan
            if not math.isfinite(scale):
                raise InvalidArgument(f"tag {shown!r}: the scale must be a number", field="prompt")
        tags.append(LoraTag(arguments[0].strip(), scale))
        return ""

    return _TAG.sub(take, prompt), tuple(tags)


def has_lora_tags(prompt: str) -> bool:
    return _TAG.search(prompt) is not None


@dataclass(frozen=True)
class Chunk:
    ids: tuple[int, ...]  # [size + 2]: BOS, up to `size` tokens, EOS, padding
    weights: tuple[float, ...]  # [size + 2], 1.0 at BOS, EOS and padding


def make_chunks(
    pieces: list[tuple[list[int] | None, float]], *, bos: int, eos: int, pad: int, comma: int | None,
    size: int = CHUNK_TOKENS,
) -> list[Chunk]:
    """Tokenized pieces (None = BREAK) -> A1111's chunks (`tokenize_line` with its defaults) of
    `size` text tokens each (75 for CLIP's 77 positions)."""
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        fill = size - len(ids)
        # A1111 fills with EOS, then turns every id after the first EOS into the pad id
        # (`process_tokens`): the layout diffusers' tokenizer gives, [BOS, text, EOS, pad...].
        chunks.append(Chunk(tuple([bos, *ids, eos, *[pad] * fill]), tuple([1.0, *weights, 1.0, *[1.0] * fill])))
        ids, weights, last_comma = [], [], -1

    for tokens, weight in pieces:
        if tokens is None:
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == size and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == size:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def apply_emphasis(hidden, weights):
    """A1111's "Original" emphasis: hidden [1, 77, dim] (torch) scaled per token by weights [77],
    then by mean(hidden) / mean(weighted) so the mean over every element is kept.

    A chunk without weights is returned as it is: A1111's x * (m / m) is x, except where m is 0
    (0/0), which a model whose final layer norm has no bias (the tiny test models) gives. Where
    the weighted mean is 0 (A1111: inf or NaN) the weighted states are kept unscaled."""
    if bool((weights == 1.0).all()):
        return hidden
    original_mean = hidden.mean()
    weighted = hidden * weights.reshape(1, -1, 1).to(hidden)
    ratio = original_mean / weighted.mean()
    if not bool(torch.isfinite(ratio)):
        return weighted
    return weighted * ratio

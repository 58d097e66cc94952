"""Fold an adapter stack into a model's weights, or take it back out.

For every module the stack adapts, the fused weight is

    W' = W + sign · Σ_k s_k · c_k · B_k @ A_k        (c_k = alpha / r of adapter k's module)

with A `[r, in·kh·kw]` and B `[out, r]` (PEFT's orientation; a LoCon conv's product reshaped to
`[out, in, kh, kw]`), the same delta the eager path adds per row (`kernels/lora_reference.py`).
The sum runs in float64 and W' is rounded once to the weight's dtype, so unfusing the same stack
(sign −1) gives the base back within one rounding of the fused weight (diffusers'
`unfuse_lora` promise), whatever the stack's length.

Textual-inversion embeddings become tokens of the model's tokenizer and rows of its token table,
with the ids diffusers' `load_textual_inversion` gives them (`placeholder_token_ids`), so a
prompt tokenizes to the same ids as the per-request path gives it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from sdserve.adapters.embeddings import TEXT_ENCODERS, TextualInversion, placeholder_token_ids
from sdserve.adapters.lora import LoRAModule
from sdserve.compile.source import StackLoRA
from sdserve.errors import InvalidArgument


def module_delta(module: LoRAModule, scale: float) -> torch.Tensor:
    """scale · c · B @ A in float64, [out, in·kh·kw]."""
    return (scale * module.scale) * (module.b.double() @ module.a.double())


def stack_deltas(stack: Sequence[StackLoRA]) -> dict[str, torch.Tensor]:
    """target -> Σ over the stack of its deltas, float64 `[out, in·kh·kw]`."""
    deltas: dict[str, torch.Tensor] = {}
    for entry in stack:
        if entry.adapter.dora_targets:
            # DoRA rescales each output channel by a norm of the fused weight: not a delta to add.
            raise InvalidArgument(f"adapter {entry.adapter.name!r} is DoRA: compile does not fuse DoRA "
                                  f"adapters yet (they are served eagerly)", field="adapters")
        for target, module in entry.adapter.modules.items():
            delta = module_delta(module, entry.scale)
            deltas[target] = deltas[target] + delta if target in deltas else delta
    return deltas


@dataclass(frozen=True)
class FoldReport:
    modules: int  # weights changed
    components: tuple[str, ...]  # components whose weights changed


@torch.no_grad()
def fold(components: Mapping[str, nn.Module], stack: Sequence[StackLoRA], *, sign: int = 1,
         progress: bool = False) -> FoldReport:
    """Add (sign 1) or subtract (sign −1) the stack's deltas to the modules' weights in place."""
    deltas = stack_deltas(stack)
    touched = set()
    for target in tqdm(sorted(deltas), desc="fuse" if sign > 0 else "unfuse", unit="module",
                       disable=not progress or not deltas, dynamic_ncols=True):
        component, _, path = target.partition(".")
        weight = components[component].get_submodule(path).weight  # [out, in] or [out, in, kh, kw]
        total = weight.double() + sign * deltas[target].reshape(weight.shape)
        weight.copy_(total.to(weight.dtype))
        touched.add(component)
    return FoldReport(len(deltas), tuple(sorted(touched)))


def check_fusable(tokenizers: Sequence, embeddings: Sequence[TextualInversion]) -> None:
    """Refuse, before any weight changes, what `add_embeddings` cannot add: tokens the vocabulary
    has or two embeddings share, and multi-vector embeddings (diffusers rewrites `tok` to
    `tok tok_1 ...` for a model's own added tokens; the eager engine does that only for
    per-request embeddings, so a fused one would serve another image than the unfused one)."""
    for embedding in embeddings:
        if embedding.num_vectors > 1:
            raise InvalidArgument(f"{embedding.name}: {embedding.num_vectors} vectors; only single-vector "
                                  "embeddings can be fused yet (serve multi-vector ones per request)",
                                  field="--embedding")
    for component, tokenizer in zip(TEXT_ENCODERS, tokenizers):
        try:
            placeholder_token_ids(tokenizer, embeddings, component)
        except InvalidArgument as error:  # AdapterError included: say which flag it came from
            raise InvalidArgument(error.message, field="--embedding") from None


@torch.no_grad()
def add_embeddings(text_encoders: Sequence[nn.Module], tokenizers: Sequence, embeddings: Sequence[TextualInversion]
                   ) -> dict[str, list[str]]:
    """Add every embedding's tokens to the tokenizers and its vectors to the token tables, in
    order; returns component -> the tokens added there (`check_fusable` first)."""
    added: dict[str, list[str]] = {}
    for component, encoder, tokenizer in zip(TEXT_ENCODERS, text_encoders, tokenizers):
        ids = placeholder_token_ids(tokenizer, embeddings, component)  # token -> id, diffusers' order
        if not ids:
            continue
        tokenizer.add_tokens(list(ids))
        for token, wanted in ids.items():
            if tokenizer.convert_tokens_to_ids(token) != wanted:  # pragma: no cover - transformers' rule changed
                raise RuntimeError(f"tokenizer gave {token!r} another id than diffusers would")
        table = encoder.get_input_embeddings()
        rows = torch.cat([e.vectors[component] for e in embeddings if component in e.vectors])  # [n, dim]
        first = len(tokenizer) - len(ids)
        if table.weight.shape[0] != first:
            raise InvalidArgument(f"{component}'s token table has {table.weight.shape[0]} rows and its tokenizer "
                                  f"{first} tokens; cannot add embeddings to it", field="--embedding")
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are set below
        encoder.get_input_embeddings().weight[first:] = rows.to(table.weight.dtype)
        added[component] = list(ids)
    return added

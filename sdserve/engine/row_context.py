"""One row context per model call: what each batch row brings to the adapter-aware modules.

A model call (one UNet step over a batch, or one text-encoder call for a prompt) runs inside
`AdapterRuntime.rows(context)`; while it runs, every adapter-aware module of the model reads the
same `RowContext` through the model's `RowContextHolder`:

- wrapped Linear/Conv2d layers (`lora_layers`): each row's LoRA stack, handed to `kernels`;
- attention processors (`ip_adapter`): each row's IP-Adapter branches and hypernetworks;
- the wrapped token tables (`adapters.embeddings.ExtraRowsEmbedding`): each row's textual
  inversions, through the reader the holder gives them at wrap time (`token_rows`), so that
  `adapters` imports nothing of the engine.

Outside a `rows` block the holder is empty and every module runs as the base model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from sdserve.adapters.embeddings import TokenRows, extra_rows_of
from sdserve.kernels import RowStack

IPBranch = tuple[Any, torch.Tensor, float]  # (IPAdapterWeights, image tokens [T, cross_dim], scale)
HypernetworkChain = tuple[tuple[Any, float], ...]  # ((Hypernetwork, strength), ...), applied in order


@dataclass(frozen=True, eq=False)
class RowContext:
    """Per batch row of one model call: its LoRA stack, IP-Adapter branches, hypernetworks and
    textual inversions. A kind no row uses may be left empty; the kinds given have one entry per row.

    Immutable (every field is stored as tuples of tuples): the LoRA dispatch recognises a call's
    stacks by identity (`LoRABatchState.observe`).
    """

    lora: Sequence[RowStack] = ()  # per row: (slot, scale) of each active LoRA, in stack order
    ip_branches: Sequence[Sequence[IPBranch]] = ()  # per row: its IP-Adapter branches
    hypernetworks: Sequence[HypernetworkChain] = ()  # per row
    embeddings: Sequence[Sequence[Any]] = ()  # per row: its TextualInversions (text-encoder calls)

    def __post_init__(self) -> None:
        fields = {
            "lora": tuple(tuple(stack) for stack in self.lora),
            "ip_branches": tuple(tuple(branches) for branches in self.ip_branches),
            "hypernetworks": tuple(tuple(chain) for chain in self.hypernetworks),
            "embeddings": tuple(tuple(row) for row in self.embeddings),
        }
        lengths = {len(rows) for rows in fields.values() if rows}
        if len(lengths) > 1:
            raise ValueError(f"row context kinds disagree on the row count: {sorted(lengths)}")
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    # What the modules read: None where no row has anything of a kind, so a module that sees
    # None runs its base computation at the cost of one check.
    @cached_property
    def lora_stacks(self) -> Sequence[RowStack] | None:
        return self.lora if any(self.lora) else None

    @cached_property
    def ip_rows(self) -> Sequence[Sequence[IPBranch]] | None:
        return self.ip_branches if any(self.ip_branches) else None

    @cached_property
    def hypernetwork_rows(self) -> Sequence[HypernetworkChain] | None:
        return self.hypernetworks if any(self.hypernetworks) else None


class RowContextHolder:
    """The row context of the model call under way, one holder per model (`AdapterRuntime`).

    Every adapter-aware module of the model is given this holder when it is wrapped or installed,
    and reads `current` while it runs.
    """

    def __init__(self) -> None:
        self.current: RowContext | None = None

    @contextmanager
    def rows(self, context: RowContext) -> Iterator[None]:
        """Within the block, row i of every adapter-aware module's input reads row i of `context`."""
        previous, self.current = self.current, context
        try:
            yield
        finally:
            self.current = previous

    def lora_stacks(self) -> Sequence[RowStack] | None:
        """Each row's (slot, scale) stack, or None when no row reads a LoRA (or no call is under way)."""
        context = self.current
        return None if context is None else context.lora_stacks

    def token_rows(self, component: str, first_extra_id: int) -> TokenRows | None:
        """The rows that token ids >= `first_extra_id` of `component`'s token table read now.

        The id order is `tokenize_with_embeddings`': each row's embeddings for `component`, in
        the row's order. Rows of one table when every row has the same embeddings (one prompt per
        call, today), else a table per row, zero-padded. None: the plain table.
        """
        context = self.current
        if context is None or not any(context.embeddings):
            return None
        first = context.embeddings[0]
        if all(len(row) == len(first) and all(a is b for a, b in zip(row, first)) for row in context.embeddings):
            shared = extra_rows_of(first, component)  # [n_extra, dim]
            return None if shared.numel() == 0 else (first_extra_id, shared)
        per_row = [extra_rows_of(row, component) for row in context.embeddings]  # [n_extra_r, dim] each
        filled = [rows for rows in per_row if rows.numel()]
        if not filled:
            return None
        longest = max(rows.shape[0] for rows in filled)
        table = filled[0].new_zeros(len(per_row), longest, filled[0].shape[1])  # [rows, n_extra, dim]
        for row, rows in enumerate(per_row):
            table[row, : rows.shape[0]] = rows
        return first_extra_id, table

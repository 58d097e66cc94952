"""Per-step batch metadata for multi-LoRA: which adapter slots (and scales) every batch row reads.

Allocated once with capacities and refilled in place each denoising step (ARCHITECTURE rule 7), so
the GPU path keeps the same buffers and can be captured in a CUDA graph. Tokens of one batch row
are contiguous in the token dimension; stacks belong to rows.

Three consumers:
- the Triton path reads the device tensors (`row_starts`, `slot_table`, `scale_table`,
  `block_rows`, `block_starts`);
- the CPU planner (`lora_cpu`, `lora_plan`) reads `plan`, a host-side grouping of rows by their
  slot stack built in `fill`, so that the CPU path never syncs on or re-derives the tables;
- the oracle (`lora_reference`) reads the tables back on the host, never `plan`, so it checks the
  grouping too.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Token-block size of the Triton path: a block never crosses a row boundary, so every block reads
# one row's stack. The kernels take it as their BLOCK_M.
DEFAULT_BLOCK_M = 64


@dataclass(frozen=True)
class StackGroup:
    """Rows that read the same slots in the same order (scales may differ per row)."""

    slots: tuple[int, ...]  # adapter slots of the stack, in stack order
    # Maximal runs of contiguous tokens whose rows share this stack AND the same scales:
    # (token_start, token_end, scales), scales aligned with `slots`.
    runs: tuple[tuple[int, int, tuple[float, ...]], ...]


@dataclass
class LoRABatchMeta:
    """Slot/scale tables of one step. Build with `LoRABatchMeta.allocate`, refill with `fill`."""

    max_rows: int
    max_tokens: int
    max_stack: int
    block_m: int  # BLOCK_M of the Triton kernels (token rows per program)
    row_starts: torch.Tensor  # [max_rows + 1] int32, token offset of each row; row i = [rs[i], rs[i+1])
    slot_table: torch.Tensor  # [max_rows, max_stack] int32, adapter slot per stack entry, -1 = empty
    scale_table: torch.Tensor  # [max_rows, max_stack] float32, scale per stack entry (0 where empty)
    stack_lens: torch.Tensor  # [max_rows] int32, number of non-empty entries of each row's stack
    block_rows: torch.Tensor  # [max_blocks] int32, row of each BLOCK_M token block, -1 = padding
    block_starts: torch.Tensor  # [max_blocks] int32, first token of each block
    num_rows: int = 0
    num_tokens: int = 0
    num_blocks: int = 0  # active blocks (rows with an empty stack get none)
    active_stack: int = 0  # longest stack of this step; the kernels loop over this many entries
    plan: tuple[StackGroup, ...] = field(default_factory=tuple)
    # CUDA-graph mode: launch over the full capacities (max_blocks, max_stack) so that grids and
    # scalar kernel arguments stay the same from step to step; padding blocks exit at once.
    static_grid: bool = False

    @classmethod
    def allocate(
        cls,
        max_rows: int,
        max_tokens: int,
        max_stack: int,
        device: torch.device | str = "cpu",
        block_m: int = DEFAULT_BLOCK_M,
    ) -> LoRABatchMeta:
        if block_m < 16 or block_m & (block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 16 (tl.dot tile), got {block_m}")
        # Each row adds at most one partial block on top of the full ones.
        max_blocks = -(-max_tokens // block_m) + max_rows
        i32 = {"dtype": torch.int32, "device": device}
        return cls(
            max_rows=max_rows,
            max_tokens=max_tokens,
            max_stack=max_stack,
            block_m=block_m,
            row_starts=torch.zeros(max_rows + 1, **i32),
            slot_table=torch.full((max_rows, max_stack), -1, **i32),
            scale_table=torch.zeros((max_rows, max_stack), dtype=torch.float32, device=device),
            stack_lens=torch.zeros(max_rows, **i32),
            block_rows=torch.full((max_blocks,), -1, **i32),
            block_starts=torch.zeros(max_blocks, **i32),
        )

    @property
    def max_blocks(self) -> int:
        return self.block_rows.shape[0]

    def fill(
        self,
        row_token_counts: Sequence[int],
        stacks: Sequence[Sequence[tuple[int, float]]],
    ) -> None:
        """Refill in place: row i has row_token_counts[i] tokens and the stack [(slot, scale), ...].

        Entries with slot < 0 are ignored; an empty stack means the row reads no adapter.
        """
        num_rows = len(row_token_counts)
        if len(stacks) != num_rows:
            raise ValueError(f"{num_rows} row token counts but {len(stacks)} stacks")
        if num_rows > self.max_rows:
            raise ValueError(f"{num_rows} rows exceed the capacity of {self.max_rows}")
        num_tokens = sum(row_token_counts)
        if num_tokens > self.max_tokens:
            raise ValueError(f"{num_tokens} tokens exceed the capacity of {self.max_tokens}")
        if any(count < 0 for count in row_token_counts):
            raise ValueError("row token counts must be non-negative")

        # Scales are rounded to float32 here so the reference and the kernels see the same value.
        clean = [[(int(s), _to_f32(c)) for s, c in stack if s >= 0] for stack in stacks]
        longest = max((len(stack) for stack in clean), default=0)
        if longest > self.max_stack:
            raise ValueError(f"a stack of {longest} entries exceeds the capacity of {self.max_stack}")

        row_starts = [0] * (self.max_rows + 1)
        slot_table = [[-1] * self.max_stack for _ in range(self.max_rows)]
        scale_table = [[0.0] * self.max_stack for _ in range(self.max_rows)]
        stack_lens = [0] * self.max_rows
        block_rows = [-1] * self.max_blocks
        block_starts = [0] * self.max_blocks
        num_blocks = 0
        for row, (count, stack) in enumerate(zip(row_token_counts, clean)):
            start = row_starts[row]
            row_starts[row + 1] = start + count
            stack_lens[row] = len(stack)
            for entry, (slot, scale) in enumerate(stack):
                slot_table[row][entry] = slot
                scale_table[row][entry] = scale
            if not stack:
                continue
            for block_start in range(start, start + count, self.block_m):
                block_rows[num_blocks] = row
                block_starts[num_blocks] = block_start
                num_blocks += 1
        # Rows past num_rows keep the last offset, so row_starts stays monotone.
        for row in range(num_rows + 1, self.max_rows + 1):
            row_starts[row] = num_tokens

        self.row_starts.copy_(torch.tensor(row_starts, dtype=torch.int32))
        self.slot_table.copy_(torch.tensor(slot_table, dtype=torch.int32))
        self.scale_table.copy_(torch.tensor(scale_table, dtype=torch.float32))
        self.stack_lens.copy_(torch.tensor(stack_lens, dtype=torch.int32))
        self.block_rows.copy_(torch.tensor(block_rows, dtype=torch.int32))
        self.block_starts.copy_(torch.tensor(block_starts, dtype=torch.int32))
        self.num_rows = num_rows
        self.num_tokens = num_tokens
        self.num_blocks = num_blocks
        self.active_stack = longest
        self.plan = _plan_groups(row_starts, clean)

    # Views of the active part; the full buffers stay allocated.
    def active_row_starts(self) -> torch.Tensor:
        return self.row_starts[: self.num_rows + 1]  # [num_rows + 1] int32

    def active_slot_table(self) -> torch.Tensor:
        return self.slot_table[: self.num_rows]  # [num_rows, max_stack] int32

    def active_scale_table(self) -> torch.Tensor:
        return self.scale_table[: self.num_rows]  # [num_rows, max_stack] float32

    def row_token_counts(self) -> list[int]:
        starts = self.active_row_starts().tolist()
        return [end - start for start, end in zip(starts[:-1], starts[1:])]


def _plan_groups(row_starts: list[int], stacks: list[list[tuple[int, float]]]) -> tuple[StackGroup, ...]:
    """Group rows by slot stack; merge adjacent rows with equal scales into one token run."""
    runs_by_slots: dict[tuple[int, ...], list[tuple[int, int, tuple[float, ...]]]] = {}
    for row, stack in enumerate(stacks):
        start, end = row_starts[row], row_starts[row + 1]
        if not stack or end == start:
            continue
        slots = tuple(slot for slot, _ in stack)
        scales = tuple(scale for _, scale in stack)
        runs = runs_by_slots.setdefault(slots, [])
        if runs and runs[-1][1] == start and runs[-1][2] == scales:
            runs[-1] = (runs[-1][0], end, scales)
        else:
            runs.append((start, end, scales))
    return tuple(StackGroup(slots=slots, runs=tuple(runs)) for slots, runs in runs_by_slots.items())


def _to_f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", float(value)))[0]

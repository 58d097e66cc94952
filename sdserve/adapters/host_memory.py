"""Host memory for adapter reads: an arena touched once, whose regions are reused.

Why: reading a 27 MB LoRA into memory the process has never touched cost 9-160 ms on the
2-core VM this was measured on (every new page is a fault that the hypervisor backs lazily),
against 1.8 ms into pages touched before; that first touch, not the copy or the checks, was
most of a cold load. So the adapter runtime owns one arena: a reserve touched once, in the
background, when the runtime starts, and regions of it handed out for files' data sections and
packed buffers. A region is free again as soon as no tensor uses it. The same shape of design
is what a CUDA host needs for pinned staging memory, which is too slow to allocate per adapter.

Freedom is read from reference counts rather than bookkept: a region is handed out as
`torch.from_numpy(array_view)`, and torch's storage holds a reference to that numpy view until
its last tensor (however sliced, viewed or reshaped) dies. So a region is free when the arena's
own reference is the only one left, whoever held it (host LRU, a CPU slot's views, a parse
that failed half-way): nothing can be recycled under a live view.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

PAGE = 4096
ALIGN = 64  # region offsets: enough for every dtype and for vector loads
GROWTH_BYTES = 64 << 20  # blocks added beyond the reserve: at least this, to amortise the faults
TOUCH_CHUNK = 8 << 20  # the reserve becomes usable this much at a time as it is touched
TOUCH_SLICE = 1 << 20  # touched per hold of the GIL (256 page faults)


def _align(value: int, to: int = ALIGN) -> int:
    return -(-value // to) * to


@dataclass
class _Region:
    offset: int
    size: int
    array: np.ndarray  # the view handed out; torch storages of its tensors reference it


@dataclass
class _Block:
    memory: np.ndarray  # uint8 [size], page aligned
    reserve: bool  # the touched-at-start reserve is kept; grown blocks go when empty
    usable: int  # bytes from the start that may be handed out (the reserve: those touched so far)
    live: list[_Region] = field(default_factory=list)  # sorted by offset

    @property
    def size(self) -> int:
        return self.memory.size

    def reclaim(self) -> None:
        # getrefcount counts the region's attribute and its own argument: 2 means nobody else.
        self.live = [region for region in self.live if sys.getrefcount(region.array) > 2]

    def fit(self, nbytes: int) -> int | None:
        """First offset where `nbytes` fit between live regions, or None."""
        position = 0
        for region in self.live:
            if region.offset - position >= nbytes:
                return position
            position = _align(region.offset + region.size)
        return position if self.usable - position >= nbytes else None

    def hand_out(self, offset: int, nbytes: int) -> torch.Tensor:
        array = self.memory[offset : offset + nbytes]
        region = _Region(offset, nbytes, array)
        index = next((i for i, r in enumerate(self.live) if r.offset > offset), len(self.live))
        self.live.insert(index, region)
        return torch.from_numpy(array)  # [nbytes] uint8; its storage references `array`


def _page_aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + PAGE, dtype=np.uint8)
    start = (-raw.ctypes.data) % PAGE
    return raw[start : start + nbytes]


class HostArena:
    """Recycled host memory for adapter data; `take` is the allocator the loaders accept.

    `reserve_bytes` are allocated at once and touched page by page by a background thread at low
    priority, becoming usable chunk by chunk (a `take` never waits for it: what is not touched
    yet is not handed out); beyond them the arena grows by blocks of at least GROWTH_BYTES,
    which are released again when nothing in them is used. Thread-safe.
    """

    def __init__(self, reserve_bytes: int, *, background: bool = True) -> None:
        self._lock = threading.Lock()
        self._blocks: list[_Block] = []
        self.overflow_bytes = 0  # bytes handed out from grown blocks, not the pre-touched reserve
        self.touched = threading.Event()  # set once the whole reserve is usable
        if reserve_bytes <= 0:
            self.touched.set()
            return
        block = _Block(_page_aligned(_align(reserve_bytes, PAGE)), reserve=True, usable=0)
        self._blocks.append(block)
        if background:
            threading.Thread(target=self._touch, args=(block,), name="sdserve-host-arena", daemon=True).start()
        else:
            self._touch(block)

    def _touch(self, block: _Block) -> None:
        try:
            if hasattr(os, "setpriority"):  # only this thread: loads and steps go first
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:
            pass
        for start in range(0, block.size, TOUCH_CHUNK):
            end = min(start + TOUCH_CHUNK, block.size)
            # One write per page faults each in. The write holds the GIL through its faults, so
            # it goes a slice at a time with the GIL given up between slices: written as one
            # chunk, the serving threads (refusals, health) waited behind this thread for the
            # first seconds after start. (Not a torch op, which would release the GIL: a daemon
            # thread inside one at interpreter exit aborts the process.)
            for slice_start in range(start, end, TOUCH_SLICE):
                block.memory[slice_start:min(slice_start + TOUCH_SLICE, end):PAGE] = 0
                time.sleep(0)
            with self._lock:  # nothing at or above `usable` has been handed out
                block.usable = end
        self.touched.set()

    @property
    def reserved_bytes(self) -> int:
        return sum(block.size for block in self._blocks)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            for block in self._blocks:
                block.reclaim()
            return sum(region.size for block in self._blocks for region in block.live)

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes` (contents undefined), 64-byte aligned."""
        if nbytes <= 0:
            return torch.empty(0, dtype=torch.uint8)
        with self._lock:
            for block in self._blocks:
                block.reclaim()
            # Empty grown blocks go back to the system; the reserve stays.
            self._blocks = [b for b in self._blocks if b.reserve or b.live]
            for block in self._blocks:
                offset = block.fit(nbytes)
                if offset is not None:
                    if not block.reserve:
                        self.overflow_bytes += nbytes
                    return block.hand_out(offset, nbytes)
            size = max(_align(nbytes, PAGE), GROWTH_BYTES)
            block = _Block(_page_aligned(size), reserve=False, usable=size)
            self._blocks.append(block)
            self.overflow_bytes += nbytes
            return block.hand_out(0, nbytes)

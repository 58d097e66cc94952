"""The host arena adapters are read into: regions never reused while any tensor views them,
reused once none does, growth beyond the reserve given back when empty, and loads through it
equal to loads into fresh memory (the oracle), failed ones leaving nothing in use."""

from __future__ import annotations

import gc

import pytest
import torch

from sdserve.adapters import load_lora
from sdserve.adapters.host_memory import ALIGN, GROWTH_BYTES, HostArena
from sdserve.errors import AdapterError
from tests.adapters.lora_factory import peft_file_contents, write_lora


def _inside(tensor: torch.Tensor, arena: HostArena) -> bool:
    start = tensor.untyped_storage().data_ptr()
    return any(
        block.memory.ctypes.data <= start < block.memory.ctypes.data + block.size for block in arena._blocks
    )


def test_regions_are_aligned_disjoint_and_hold_their_bytes():
    arena = HostArena(1 << 20, background=False)
    regions = [arena.take(size) for size in (1, 100, 4096, 5000, 77)]
    for index, region in enumerate(regions):
        assert region.dtype == torch.uint8 and region.data_ptr() % ALIGN == 0
        region.fill_(index)
    for index, region in enumerate(regions):  # no region overwrote another
        assert bool((region == index).all())
    assert arena.used_bytes == 1 + 100 + 4096 + 5000 + 77


def test_a_region_is_reused_only_when_no_view_of_it_remains():
    arena = HostArena(1 << 16, background=False)
    first = arena.take(1024)
    address = first.data_ptr()
    floats = first.view(torch.float32)[8:].reshape(-1, 4)  # a view the arena never saw
    del first
    assert arena.take(1024).data_ptr() != address  # floats still lives on the region
    floats.fill_(1.5)
    del floats
    gc.collect()
    assert arena.take(1024).data_ptr() == address


def test_growth_beyond_the_reserve_is_given_back_when_empty():
    arena = HostArena(1 << 16, background=False)
    big = arena.take(1 << 20)  # beyond the reserve: a grown block
    assert arena.reserved_bytes == (1 << 16) + GROWTH_BYTES and arena.overflow_bytes == 1 << 20
    del big
    arena.take(16)  # the next take releases the empty grown block
    assert arena.reserved_bytes == 1 << 16


def test_no_reserve_only_grows():
    arena = HostArena(0)
    region = arena.take(100)
    assert region.numel() == 100 and arena.overflow_bytes == 100


@pytest.mark.parametrize("layout", ["peft", "kohya"])  # kept from the file / packed by copying
def test_load_through_the_arena_equals_fresh_load(sd15_targets, sd15_lora, tmp_path, layout):
    path = tmp_path / "a.safetensors"
    write_lora(sd15_lora, path, layout)
    arena = HostArena(1 << 22, background=False)
    fresh = load_lora(path, "t/a", sd15_targets)
    pooled = load_lora(path, "t/a", sd15_targets, alloc=arena.take)
    assert _inside(pooled.buffer, arena) and torch.equal(pooled.buffer, fresh.buffer)
    for target, module in fresh.modules.items():
        assert torch.equal(pooled.modules[target].a, module.a) and torch.equal(pooled.modules[target].b, module.b)
    address = pooled.buffer.untyped_storage().data_ptr()
    del pooled
    gc.collect()
    again = load_lora(path, "t/a", sd15_targets, alloc=arena.take)  # the memory is reused
    assert torch.equal(again.buffer, fresh.buffer) and arena.reserved_bytes == 1 << 22
    if layout == "peft":  # the buffer is the file's data, read to the same place
        assert again.buffer.untyped_storage().data_ptr() == address


def test_failed_load_leaves_nothing_in_use(sd15_targets, sd15_lora, tmp_path):
    tensors, metadata = peft_file_contents(sd15_lora)
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    import safetensors.torch

    path = tmp_path / "nan.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    arena = HostArena(1 << 22, background=False)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        load_lora(path, "t/nan", sd15_targets, alloc=arena.take)
    gc.collect()
    assert arena.used_bytes == 0


def test_background_touch_makes_the_reserve_usable():
    arena = HostArena(24 << 20)  # three chunks, touched by the arena's thread
    assert arena.touched.wait(30)
    region = arena.take(20 << 20)
    assert _inside(region, arena) and arena.overflow_bytes == 0

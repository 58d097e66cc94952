"""Trainers give torch's thread count back: it is process-global, and a training call made in
process (the Python API, this test session) once left later forwards single-threaded."""

from __future__ import annotations

import pytest
import torch

from sdserve.trainers import base_model, decoder, loop
from sdserve.trainers.threads import keeps_torch_threads


def test_thread_count_is_restored_after_return_and_after_raise():
    before = torch.get_num_threads()

    @keeps_torch_threads
    def run(fail: bool) -> int:
        torch.set_num_threads(1 if before > 1 else 2)
        if fail:
            raise RuntimeError("diverged")
        return torch.get_num_threads()

    assert run(False) != before and torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        run(True)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("function", [loop.train, base_model.train_base, decoder.anchor_latents,
                                      decoder.widen_decoder])
def test_every_entry_point_that_sets_threads_restores_them(function):
    assert getattr(function, "__wrapped__", None) is not None, function.__name__

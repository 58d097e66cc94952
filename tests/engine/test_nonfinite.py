"""A row whose latents turn non-finite fails alone, with INTERNAL naming the step.

Adapter files are checked for non-finite numbers when they load, but finite weights can still
overflow inside the UNet (here: factors of 1e19, whose product passes float32's 3.4e38). Such a
request used to come back OK with a black image; its batch-mates must be untouched by it.
"""

from __future__ import annotations

import pytest
import safetensors.torch

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.request import AdapterSpec
from sdserve.errors import Internal
from tests.engine.lora_cases import write_model_lora
from tests.engine.oracle import max_pixel_difference

MODEL = "tiny-sd1"


@pytest.fixture(scope="module")
def overflowing_lora(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nonfinite")
    path = write_model_lora(MODEL, directory, "big", rank=4, alpha=4.0, seed=5)
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    # Every factor finite, every product of two of them past float32's range.
    tensors = {key: (value * 1e19).contiguous() for key, value in tensors.items()}
    out = directory / "overflowing.safetensors"
    safetensors.torch.save_file(tensors, out, metadata=metadata)
    return out


def _spec(seed: int, adapters=()) -> RequestSpec:
    return RequestSpec(model=MODEL, prompt="a red circle", seed=seed, steps=3, adapters=adapters)


def test_nonfinite_row_fails_with_its_step_and_batch_mates_are_unchanged(overflowing_lora):
    engine = Engine(EngineConfig(max_batch_rows=16))
    bad = engine.validate(_spec(1, (AdapterSpec(path=str(overflowing_lora), scale=1.0),)))
    good = [engine.validate(_spec(seed)) for seed in (2, 3)]
    alone = [engine.generate([request])[0] for request in good]

    outcomes = engine.generate([good[0], bad, good[1]])

    assert isinstance(outcomes[1], Internal), outcomes[1]
    assert "non-finite" in str(outcomes[1]) and "step 1 of 3" in str(outcomes[1])
    for outcome, reference in zip((outcomes[0], outcomes[2]), alone):
        assert not isinstance(outcome, Exception), outcome
        assert max_pixel_difference(outcome.images[0], reference.images[0]) <= 1

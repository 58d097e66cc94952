"""One batch of 12 requests mixing every served adapter kind: LoRA, LoCon (LoRA on the ResNet convs
too), LoHa, LoKr and DoRA, at different scales and step windows, alone and stacked. Every request
gets the image it gets alone (<= 2/255), and the stacks really share UNet calls.

Each kind's own oracle (diffusers + PEFT for LoRA, LoCon and DoRA; lycoris-lora's merge for LoHa
and LoKr) is checked per kind in test_lora_parity.py, test_dora.py and
tests/adapters/test_lycoris_serving.py; this test is about the mix.
"""

from __future__ import annotations

import pytest
import safetensors.torch

from sdserve.adapters import targets_of
from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.request import AdapterSpec
from tests.adapters.lycoris_factory import make_lycoris
from tests.engine.lora_cases import UNET_ATTENTION, UNET_CONV, model_components, write_model_lora
from tests.engine.oracle import generate_together_and_alone, max_pixel_difference
from tests.engine.test_dora import write_dora

MODEL = "tiny-sd1"
TOLERANCE = 2


def _plan(targets, suffixes: dict[str, tuple[str, dict]]) -> dict[str, tuple[str, dict]]:
    return {target: plan for target in targets for suffix, plan in suffixes.items()
            if target.startswith("unet.") and target.endswith(suffix)}


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("kinds")
    components = model_components(MODEL)
    targets = targets_of(components)
    files = {
        "lora": write_model_lora(MODEL, directory, "lora", rank=4, alpha=4.0, text_encoder=True, seed=3),
        "locon": write_model_lora(MODEL, directory, "locon", rank=4, alpha=2.0,
                                  unet_targets=UNET_ATTENTION + UNET_CONV, seed=4),
        # DoRA must be alone on its modules (its norm is of the whole column): q and v only, so
        # it stacks with the LoKr below (k, out, convs) but not with the LoRAs or the LoHa.
        "dora": write_dora(directory, "dora", alpha=16.0, targets=["to_q", "to_v"], seed=5),
    }
    for name, plan, seed in (
        ("loha", _plan(targets, {"to_q": ("loha", {"lora_dim": 4, "alpha": 2.0}),
                                 "to_v": ("loha", {"lora_dim": 2, "alpha": 2.0}),
                                 "conv2": ("loha", {"lora_dim": 2, "alpha": 1.0, "use_tucker": True})}), 1),
        ("lokr", _plan(targets, {"to_k": ("lokr", {"lora_dim": 2, "alpha": 1.0}),
                                 "to_out.0": ("lokr", {"lora_dim": 2, "full_matrix": True}),
                                 "conv1": ("lokr", {"lora_dim": 2, "alpha": 2.0, "factor": 4})}), 2),
    ):
        files[name] = directory / f"{name}.safetensors"
        safetensors.torch.save_file(make_lycoris(components, plan, seed=seed, std=0.5), files[name])
    return {name: str(path) for name, path in files.items()}


# (kind, scale, start, end) per stack entry; 12 requests, every kind alone and in stacks.
STACKS = [
    [("lora", 0.8, 0.0, 1.0)],
    [("locon", 1.0, 0.0, 1.0)],
    [("loha", 0.7, 0.0, 1.0)],
    [("lokr", -0.6, 0.0, 1.0)],
    [("dora", 1.0, 0.0, 1.0)],
    [("dora", -0.5, 0.34, 1.0), ("lokr", 0.9, 0.0, 1.0)],
    [("locon", 0.5, 0.0, 0.67), ("loha", -0.4, 0.0, 1.0)],
    [("lora", 0.6, 0.0, 1.0), ("lokr", 0.5, 0.34, 1.0), ("loha", 0.3, 0.0, 1.0)],
    [("dora", 0.6, 0.0, 0.67)],
    [],
    [("locon", -0.8, 0.0, 1.0), ("lora", 0.4, 0.0, 1.0), ("lokr", 1.2, 0.0, 0.67)],
    [("loha", 1.1, 0.34, 1.0), ("lokr", 0.3, 0.0, 1.0)],
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(max_batch_rows=32))


def _request(engine: Engine, paths: dict[str, str], index: int, stack) -> object:
    adapters = tuple(AdapterSpec(path=paths[kind], scale=scale, start=start, end=end)
                     for kind, scale, start, end in stack)
    spec = RequestSpec(model=MODEL, prompt=["a red circle", "a blue square on the left"][index % 2],
                       negative_prompt="blurry", seed=100 + index, steps=3, width=32, height=32,
                       guidance_scale=[6.0, 1.0][index % 3 == 2], scheduler="euler", adapters=adapters)
    return engine.validate(spec)


def test_twelve_requests_mixing_every_kind_match_alone(engine, paths):
    requests = [_request(engine, paths, index, stack) for index, stack in enumerate(STACKS)]
    together, calls, differences = generate_together_and_alone(engine, requests)
    assert max(calls) >= 10, f"the 12 stacks must share UNet calls (distinct stacks per call: {calls})"
    print(f"mixed batch of 12 vs alone, max pixel differences: {differences}")
    assert max(differences) <= TOLERANCE, differences
    # Each stack changes its request's image: the same requests without adapters, in one batch.
    bare = engine.generate([_request(engine, paths, index, []) for index in range(len(STACKS))])
    changes = [max_pixel_difference(b.images[0], m.images[0]) for b, m in zip(bare, together, strict=True)]
    print(f"each request against itself without adapters: {changes}")
    assert all(change > 2 * TOLERANCE for change, stack in zip(changes, STACKS, strict=True) if stack), changes

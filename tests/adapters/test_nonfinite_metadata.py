"""Every number an adapter file gives is checked: a PEFT `lora_alpha` of NaN, inf or 1e300 was
accepted and served black images with status OK.

Python's json reads `NaN`, `Infinity` and `-Infinity` (and 1e400 as inf), which is how these
values reach a config; kohya files carry alphas as tensors. A scale |alpha / rank| past
`MAX_SCALE` is refused whatever the layout.
"""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch

from sdserve.adapters import MAX_SCALE, load_lora
from sdserve.adapters.hypernetwork import METADATA_KEY as HYPERNETWORK_KEY
from sdserve.adapters.hypernetwork import load_hypernetwork
from sdserve.errors import AdapterError
from tests.adapters.lora_factory import kohya_file_contents, peft_file_contents

NAME = "tenant-a/numbers"
BAD_ALPHAS = [float("nan"), float("inf"), -float("inf"), 1e300, -1e300]


def _peft_with(sd15_lora, **fields: object) -> bytes:
    """The fixture's PEFT file with config fields ("unet.lora_alpha", ...) replaced."""
    tensors, metadata = peft_file_contents(sd15_lora)
    config = json.loads(metadata["lora_adapter_metadata"])
    config.update({key.replace("__", "."): value for key, value in fields.items()})
    return safetensors.torch.save(tensors, metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})


def _problem(data: bytes, targets) -> str:
    with pytest.raises(AdapterError) as info:
        load_lora(data, NAME, targets)
    assert info.value.adapter_name == NAME
    return info.value.problem


@pytest.mark.parametrize("alpha", BAD_ALPHAS, ids=repr)
def test_peft_lora_alpha(alpha, sd15_targets, sd15_lora):
    problem = _problem(_peft_with(sd15_lora, unet__lora_alpha=alpha), sd15_targets)
    if math.isfinite(alpha):
        assert "scale alpha / rank" in problem and "beyond the limit of 1000" in problem
    else:
        assert f"lora_adapter_metadata: unet.lora_alpha must be a finite number (got {alpha!r})" == problem


@pytest.mark.parametrize("alpha", BAD_ALPHAS, ids=repr)
def test_peft_alpha_pattern(alpha, sd15_targets, sd15_lora):
    problem = _problem(_peft_with(sd15_lora, unet__alpha_pattern={"to_k": alpha}), sd15_targets)
    if math.isfinite(alpha):
        assert "to_k'" in problem and "beyond the limit" in problem
    else:
        assert "unet.alpha_pattern value for 'to_k' must be a finite number" in problem


def test_peft_rslora_alpha(sd15_targets, sd15_lora):
    """rsLoRA divides by sqrt(rank) (the fixture's text encoder: r=3, rsLoRA): bounded the same."""
    problem = _problem(_peft_with(sd15_lora, text_encoder__lora_alpha=1e6), sd15_targets)
    assert "scale alpha / sqrt(rank) = 1e+06 / 3" in problem


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"unet__r": "4"}, "unet.r must be a positive integer (got '4')"),
        ({"unet__r": 4.5}, "unet.r must be a positive integer (got 4.5)"),
        ({"unet__r": True}, "unet.r must be a positive integer (got True)"),
        ({"unet__r": 0}, "unet.r must be a positive integer (got 0)"),
        ({"unet__r": -4}, "unet.r must be a positive integer (got -4)"),
        ({"unet__r": float("nan")}, "unet.r must be a positive integer (got nan)"),
        ({"unet__lora_alpha": "6"}, "unet.lora_alpha must be a finite number (got '6')"),
        ({"unet__lora_alpha": True}, "unet.lora_alpha must be a finite number (got True)"),
        ({"unet__rank_pattern": {"conv1": 0}}, "unet.rank_pattern value for 'conv1' must be a positive integer"),
        ({"unet__rank_pattern": {"conv1": 2.0}}, "unet.rank_pattern value for 'conv1' must be a positive integer"),
        ({"unet__rank_pattern": {"conv1": float("inf")}}, "unet.rank_pattern value for 'conv1' must be a positive"),
        ({"unet__rank_pattern": ["conv1", 2]}, "unet.rank_pattern must be an object"),
        ({"unet__alpha_pattern": {"to_k": "3"}}, "unet.alpha_pattern value for 'to_k' must be a finite number"),
        ({"text_encoder__use_rslora": "yes"}, "text_encoder.use_rslora must be true or false (got 'yes')"),
        ({"text_encoder__use_rslora": 1}, "text_encoder.use_rslora must be true or false (got 1)"),
    ],
)
def test_peft_config_numbers(fields, needle, sd15_targets, sd15_lora):
    problem = _problem(_peft_with(sd15_lora, **fields), sd15_targets)
    assert problem.startswith("lora_adapter_metadata: ") and needle in problem


def test_deeply_nested_config_is_an_adapter_error(sd15_targets, sd15_lora):
    """json raises RecursionError, not ValueError, for arrays nested thousands deep."""
    tensors, metadata = peft_file_contents(sd15_lora)
    data = safetensors.torch.save(tensors, metadata={**metadata, "lora_adapter_metadata": "[" * 100_000})
    assert "lora_adapter_metadata" in _problem(data, sd15_targets)


def _kohya_with_alpha(sd15_lora, value: float) -> tuple[bytes, str]:
    tensors, metadata = kohya_file_contents(sd15_lora)
    key = sorted(k for k in tensors if k.endswith(".alpha"))[0]
    tensors[key] = torch.tensor(value, dtype=torch.float64)
    return safetensors.torch.save(tensors, metadata=metadata), key


@pytest.mark.parametrize("alpha", BAD_ALPHAS, ids=repr)
def test_kohya_alpha_tensor(alpha, sd15_targets, sd15_lora):
    data, key = _kohya_with_alpha(sd15_lora, alpha)
    problem = _problem(data, sd15_targets)
    if math.isfinite(alpha):
        assert "beyond the limit of 1000" in problem
    else:
        assert problem == f"alpha {key!r} is not finite"


def test_scale_bound_is_inclusive(sd15_targets, sd15_lora):
    """A kohya module whose alpha gives exactly MAX_SCALE loads; one a hair above does not."""
    tensors, _ = kohya_file_contents(sd15_lora)
    key = sorted(k for k in tensors if k.endswith(".alpha"))[0]
    rank = tensors[key.replace(".alpha", ".lora_down.weight")].shape[0]
    data, _ = _kohya_with_alpha(sd15_lora, MAX_SCALE * rank)
    adapter = load_lora(data, NAME, sd15_targets)
    assert max(abs(m.scale) for m in adapter.modules.values()) == MAX_SCALE
    data, _ = _kohya_with_alpha(sd15_lora, MAX_SCALE * rank * 1.0001)
    assert "beyond the limit" in _problem(data, sd15_targets)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=repr)
def test_non_finite_factor(layout, value, sd15_targets, sd15_lora):
    """Factors are checked on both load paths: the file's buffer kept (peft) and packed (kohya)."""
    tensors, metadata = peft_file_contents(sd15_lora) if layout == "peft" else kohya_file_contents(sd15_lora)
    suffix = ".lora_A.weight" if layout == "peft" else ".lora_down.weight"
    key = sorted(k for k in tensors if k.endswith(suffix))[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    problem = _problem(safetensors.torch.save(tensors, metadata=metadata), sd15_targets)
    assert "NaN or infinite" in problem


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_normal_file_still_loads(layout, sd15_targets, sd15_lora):
    tensors, metadata = peft_file_contents(sd15_lora) if layout == "peft" else kohya_file_contents(sd15_lora)
    adapter = load_lora(safetensors.torch.save(tensors, metadata=metadata), NAME, sd15_targets)
    for target, module in adapter.modules.items():
        assert module.scale == pytest.approx(sd15_lora.scalings[target]), target


# --- hypernetworks: the numbers in their metadata ---------------------------------------------


def _hypernetwork(structure_json: str, hidden: int = 16) -> bytes:
    """Width 8, one hidden layer of `hidden` units (the size the structure gives, so that only
    the metadata can be wrong)."""
    config = ('{"format": 1, "layer_structure": ' + structure_json
              + ', "activation": "relu", "activate_output": false, "layer_norm": false}')
    tensors = {}
    for side in "kv":
        tensors |= {f"hypernetwork.8.{side}.0.weight": torch.randn(hidden, 8),
                    f"hypernetwork.8.{side}.0.bias": torch.randn(hidden),
                    f"hypernetwork.8.{side}.1.weight": torch.randn(8, hidden),
                    f"hypernetwork.8.{side}.1.bias": torch.randn(8)}
    return safetensors.torch.save(tensors, metadata={HYPERNETWORK_KEY: config})


@pytest.mark.parametrize(
    ("structure", "needle"),
    [
        ("[1, NaN, 1]", "layer_structure must be"),
        ("[1, Infinity, 1]", "layer_structure must be"),
        ("[1, 1e300, 1]", "layer_structure must be"),
        ("[1, true, 1]", "layer_structure must be"),
        ("[1, 1e-300, 1]", "gives width 8 a layer of 0 units"),
        ("[1, 0.1, 1]", "gives width 8 a layer of 0 units"),  # int(8 * 0.1) = 0
        ("[" * 100_000, "metadata is not valid"),
    ],
)
def test_hypernetwork_structure_numbers(structure, needle):
    assert load_hypernetwork(_hypernetwork("[1, 2, 1]"), "hn").modules  # the file is otherwise good
    hidden = 0 if "0 units" in needle else 16  # tensors shaped as A1111 would build them
    with pytest.raises(AdapterError) as info:
        load_hypernetwork(_hypernetwork(structure, hidden), "hn")
    assert needle in info.value.problem

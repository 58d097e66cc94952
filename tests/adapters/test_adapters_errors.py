"""Every bad file raises one typed error that names the file (as the caller calls it) and the
problem, and never a server path or a library traceback."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from sdserve.adapters import load_lora
from sdserve.errors import AdapterError, UnsupportedAdapterKind
from tests.adapters.lora_factory import kohya_file_contents, peft_file_contents

NAME = "tenant-a/my-style"


def _write(tmp_path, tensors, metadata=None):
    path = tmp_path / "server-side-secret-dir" / "blob.safetensors"
    path.parent.mkdir(exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def _error(source, targets, tmp_path, expected=AdapterError, **kwargs) -> AdapterError:
    with pytest.raises(expected) as info:
        load_lora(source, NAME, targets, **kwargs)
    err = info.value
    assert type(err) is expected
    assert err.adapter_name == NAME and NAME in str(err)
    assert str(tmp_path) not in str(err) and "Traceback" not in str(err) and "Error while" not in str(err)
    return err


@pytest.fixture()
def peft_sd(sd15_lora):
    tensors, metadata = peft_file_contents(sd15_lora)
    return tensors, metadata


# --- not a safetensors file -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["truncated", "pickle", "garbage", "empty", "huge_header", "json_not_dict"])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_not_safetensors(case, as_bytes, sd15_targets, peft_sd, tmp_path):
    good = _write(tmp_path, *peft_sd).read_bytes()
    if case == "truncated":
        data = good[: len(good) - 100]
    elif case == "pickle":
        pickled = tmp_path / "pickled.pt"
        torch.save(peft_sd[0], pickled)  # a .pt/.ckpt renamed .safetensors
        data = pickled.read_bytes()
    elif case == "garbage":
        data = bytes(range(256)) * 8
    elif case == "empty":
        data = b""
    elif case == "huge_header":
        data = (2**40).to_bytes(8, "little") + b"{}"
    else:
        header = b"[1, 2, 3]"
        data = len(header).to_bytes(8, "little") + header
    path = tmp_path / "renamed.safetensors"
    path.write_bytes(data)
    err = _error(data if as_bytes else path, sd15_targets, tmp_path)
    assert err.problem == "not a valid safetensors file"


def test_missing_file(sd15_targets, tmp_path):
    err = _error(tmp_path / "nope.safetensors", sd15_targets, tmp_path)
    assert err.problem == "file could not be read"


# --- LoRA content checked against the base model --------------------------------------------


def _first_key(tensors, suffix):
    return sorted(k for k in tensors if k.endswith(suffix))[-1]  # the last module packed


@pytest.mark.parametrize("which", ["down_in", "up_out", "rank_mismatch", "conv_kernel"])
def test_wrong_shapes(which, sd15_targets, peft_sd, tmp_path):
    tensors, metadata = dict(peft_sd[0]), peft_sd[1]
    if which == "conv_kernel":
        key = _first_key({k: v for k, v in tensors.items() if v.shape[-2:] == (3, 3)}, "lora_A.weight")
        tensors[key] = tensors[key][:, :, :1, :1]  # a 3x3 conv's LoRA stored as 1x1
    else:
        key = _first_key(tensors, "lora_A.weight" if which == "down_in" else "lora_B.weight")
        if which == "down_in":
            tensors[key] = torch.cat([tensors[key], tensors[key][:, :1]], dim=1)
        elif which == "up_out":
            tensors[key] = tensors[key][:-1]
        else:
            tensors[key] = tensors[key][:, :-1]
    err = _error(_write(tmp_path, tensors, metadata), sd15_targets, tmp_path)
    assert "shape" in err.problem and "base model needs" in err.problem


def test_config_rank_disagrees_with_weights(sd15_targets, peft_sd, tmp_path):
    tensors, metadata = peft_sd
    config = json.loads(metadata["lora_adapter_metadata"])
    config["unet.r"] = 8
    metadata = {**metadata, "lora_adapter_metadata": json.dumps(config)}
    err = _error(_write(tmp_path, tensors, metadata), sd15_targets, tmp_path)
    assert "declares rank 8" in err.problem


@pytest.mark.parametrize("broken", ["{not json", "[1]", json.dumps({"unet.r": "four"})])
def test_invalid_config(broken, sd15_targets, peft_sd, tmp_path):
    metadata = {**peft_sd[1], "lora_adapter_metadata": broken}
    err = _error(_write(tmp_path, peft_sd[0], metadata), sd15_targets, tmp_path)
    assert "lora_adapter_metadata" in err.problem


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"unet.no_such_block.to_q.lora_A.weight": torch.ones(2, 4),
          "unet.no_such_block.to_q.lora_B.weight": torch.ones(4, 2)}, "does not match any module"),
        ({"unet.conv_in.weight": torch.ones(1)}, "unexpected key"),
        ({"unet.no_partner.lora_A.weight": torch.ones(2, 4)}, "no matching up/down partner"),
        ({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4)}, "mixes LoRA key layouts"),
    ],
)
def test_unknown_and_stray_keys(extra, problem, sd15_targets, peft_sd, tmp_path):
    err = _error(_write(tmp_path, {**peft_sd[0], **extra}, peft_sd[1]), sd15_targets, tmp_path)
    assert problem in err.problem


def test_kohya_name_without_module(sd15_targets, sd15_lora, tmp_path):
    tensors, _ = kohya_file_contents(sd15_lora)
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.ones(2, 32)
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.ones(32, 2)
    err = _error(_write(tmp_path, tensors), sd15_targets, tmp_path)
    assert "lora_unet_down_blocks_7" in err.problem and "does not match any module" in err.problem


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_non_finite_values(value, factor, sd15_targets, peft_sd, tmp_path):
    tensors = dict(peft_sd[0])
    key = _first_key(tensors, f"{factor}.weight")
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[-1] = value
    err = _error(_write(tmp_path, tensors, peft_sd[1]), sd15_targets, tmp_path)
    assert "NaN or infinite" in err.problem


def test_overflow_in_serving_dtype(sd15_targets, peft_sd, tmp_path):
    tensors = dict(peft_sd[0])
    key = _first_key(tensors, "lora_B.weight")
    tensors[key] = tensors[key] * 1e6  # finite in float32, not in float16
    path = _write(tmp_path, tensors, peft_sd[1])
    load_lora(path, NAME, sd15_targets)
    err = _error(path, sd15_targets, tmp_path, dtype=torch.float16)
    assert "in float16" in err.problem


def test_non_float_weights(sd15_targets, peft_sd, tmp_path):
    tensors = dict(peft_sd[0])
    key = _first_key(tensors, "lora_A.weight")
    tensors[key] = tensors[key].to(torch.int32)
    assert "expected a floating-point type" in _error(_write(tmp_path, tensors, peft_sd[1]), sd15_targets, tmp_path).problem


def test_rank_zero(sd15_targets, tmp_path):
    tensors = {"unet.conv_out.lora_A.weight": torch.ones(0, 32, 3, 3), "unet.conv_out.lora_B.weight": torch.ones(4, 0, 1, 1)}
    assert "rank is 0" in _error(_write(tmp_path, tensors), sd15_targets, tmp_path).problem


def test_rank_above_maximum(sd15_targets, peft_sd, tmp_path):
    path = _write(tmp_path, *peft_sd)
    err = _error(path, sd15_targets, tmp_path, max_rank=3)
    assert "rank 4 exceeds the maximum of 3" in err.problem
    assert load_lora(path, NAME, sd15_targets, max_rank=4).max_rank == 4


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_lora_for_another_family(layout, sd15_targets, sdxl_targets, sd15_lora, sdxl_lora, tmp_path):
    """An SDXL LoRA on SD 1.x and an SD 1.x LoRA on SDXL: keys that do not map or shapes that
    do not fit, refused either way."""
    for lora, targets in ((sdxl_lora, sd15_targets), (sd15_lora, sdxl_targets)):
        tensors, metadata = peft_file_contents(lora) if layout == "peft" else kohya_file_contents(lora)
        err = _error(_write(tmp_path, tensors, metadata), targets, tmp_path)
        assert "does not match any module" in err.problem or "shape" in err.problem


# --- other adapter kinds ---------------------------------------------------------------------


def _peft_loha():
    """PEFT's LoHa layout: LoHa is served in the kohya/LyCORIS layout only."""
    stem = "unet.down_blocks.0.resnets.0.conv1"
    return {f"{stem}.hada_w1_a": torch.ones(32, 2), f"{stem}.hada_w1_b": torch.ones(2, 288),
            f"{stem}.hada_w2_a": torch.ones(32, 2), f"{stem}.hada_w2_b": torch.ones(2, 288)}


_STEM = "lora_unet_down_blocks_0_resnets_0_conv1"


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (_peft_loha, "loha (outside the kohya/LyCORIS layout)"),
        ({f"{_STEM}.oft_blocks": torch.ones(4, 8, 8), f"{_STEM}.alpha": torch.tensor(1.0)}, "oft"),
        ({"unet.conv_in.boft_R": torch.ones(1, 4, 2, 2), "unet.conv_in.boft_s": torch.ones(32, 1)}, "boft"),
        ({f"{_STEM}.weight": torch.ones(32, 32, 3, 3), f"{_STEM}.on_input": torch.tensor(True)}, "ia3"),
        ({f"{_STEM}.a1.weight": torch.ones(2, 32), f"{_STEM}.a2.weight": torch.ones(32, 2)}, "glora"),
        ({"lora_unet_conv_in.diff": torch.ones(32, 4, 3, 3), "lora_unet_conv_in.diff_b": torch.ones(32)}, "diff"),
    ],
)
def test_unsupported_kinds(make, kind, sd15_targets, sd15_lora, tmp_path):
    tensors = make() if callable(make) else make
    err = _error(_write(tmp_path, tensors, None), sd15_targets, tmp_path, UnsupportedAdapterKind)
    assert err.kind == kind and repr(kind) in err.problem


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        # DoRA is served; these files are not well-formed DoRA files.
        ("kohya_dora_input_side", "DoRA magnitude"),  # LyCORIS wd_on_out=False: [1, in], another formula
        ("peft_dora_alone", "no matching up/down partner"),  # a magnitude with no factors
        ("metadata_dora", "holds no lora_magnitude_vector"),  # use_dora with no magnitudes
    ],
)
def test_malformed_dora(make, problem, sd15_targets, sd15_lora, tmp_path):
    metadata = None
    if make == "kohya_dora_input_side":
        tensors, _ = kohya_file_contents(sd15_lora)
        stem = next(k for k in tensors if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
        tensors[f"{stem}.dora_scale"] = torch.ones(1, 32)
    elif make == "peft_dora_alone":
        tensors, metadata = peft_file_contents(sd15_lora)
        tensors["unet.conv_in.lora_magnitude_vector"] = torch.ones(32)
    else:
        tensors, metadata = peft_file_contents(sd15_lora)
        config = json.loads(metadata["lora_adapter_metadata"])
        config["unet.use_dora"] = True
        metadata = {**metadata, "lora_adapter_metadata": json.dumps(config)}
    err = _error(_write(tmp_path, tensors, metadata), sd15_targets, tmp_path)
    assert problem in err.problem and "\n" not in err.problem


@pytest.mark.parametrize(
    ("tensors", "problem"),
    [
        ({"emb_params": torch.ones(2, 32)}, "textual-inversion"),
        ({"clip_l": torch.ones(2, 32), "clip_g": torch.ones(2, 64)}, "textual-inversion"),
        ({"conv_in.weight": torch.ones(32, 4, 3, 3)}, "no LoRA weight keys"),
    ],
)
def test_not_a_lora(tensors, problem, sd15_targets, tmp_path):
    err = _error(_write(tmp_path, tensors), sd15_targets, tmp_path)
    assert err.problem.startswith("not a LoRA file") and problem in err.problem

"""Loading LoRA files of every layout: the packed factors reproduce PEFT's own deltas."""

from __future__ import annotations

import math

import pytest
import torch

from sdserve.adapters import LoRAAdapter, TargetSpec, load_lora, targets_of
from tests.adapters.lora_factory import LAYOUTS, UNSCALED_LAYOUTS, tiny_unet, write_lora

FAMILY_LAYOUTS = [
    (family, layout)
    for family in ("sd15", "sdxl")
    for layout in LAYOUTS
    if not (family == "sd15" and layout == "kohya_sgm")  # sgm names exist for SDXL only
]


@pytest.mark.parametrize(("family", "layout"), FAMILY_LAYOUTS, indirect=["family"])
def test_deltas_match_peft(family, layout, tmp_path):
    """scale·B@A of every module equals PEFT's get_delta_weight (the independent oracle)."""
    _, targets, lora = family
    path = tmp_path / "lora.safetensors"
    write_lora(lora, path, layout)
    adapter = load_lora(path, "my-lora", targets)

    assert set(adapter.modules) == set(lora.deltas)
    for target, module in adapter.modules.items():
        expected = lora.deltas[target]
        if layout in UNSCALED_LAYOUTS:
            expected = expected / lora.scalings[target]
        torch.testing.assert_close(module.delta_weight(), expected, rtol=1e-5, atol=1e-6)
        assert module.rank == lora.ranks[target]


@pytest.mark.parametrize("family", ["sd15", "sdxl"], indirect=True)
def test_scales_follow_peft_rules(family, tmp_path):
    """alpha/r, alpha_pattern/rank_pattern per module, alpha/sqrt(r) for rsLoRA."""
    _, targets, lora = family
    write_lora(lora, tmp_path / "a.safetensors", "peft")
    adapter = load_lora(tmp_path / "a.safetensors", "a", targets)
    conv1 = next(m for t, m in adapter.modules.items() if t.endswith("resnets.0.conv1"))
    to_k = next(m for t, m in adapter.modules.items() if t.endswith("attn1.to_k"))
    to_q = next(m for t, m in adapter.modules.items() if t.endswith("attn1.to_q"))
    q_proj = next(m for t, m in adapter.modules.items() if t.startswith("text_encoder.") and t.endswith("q_proj"))
    assert (conv1.rank, conv1.scale) == (2, pytest.approx(6 / 2))
    assert (to_k.rank, to_k.scale) == (4, pytest.approx(3 / 4))
    assert (to_q.rank, to_q.scale) == (4, pytest.approx(6 / 4))
    assert (q_proj.rank, q_proj.scale) == (3, pytest.approx(5 / math.sqrt(3)))
    assert conv1.kind == "conv" and conv1.a.shape == (2, conv1.in_features * 9)


@pytest.mark.parametrize("family", ["sd15", "sdxl"], indirect=True)
def test_kohya_and_peft_layouts_give_identical_modules(family, tmp_path):
    _, targets, lora = family
    loaded = {}
    layouts = ["peft", "kohya"] + (["kohya_sgm"] if "text_encoder_2" in lora.configs else [])
    for layout in layouts:
        write_lora(lora, tmp_path / f"{layout}.safetensors", layout)
        loaded[layout] = load_lora(tmp_path / f"{layout}.safetensors", layout, targets)
    reference = loaded["peft"]
    for layout, adapter in loaded.items():
        assert adapter.layout == ("peft" if layout == "peft" else "kohya")
        assert list(adapter.modules) == list(reference.modules)
        for target, module in adapter.modules.items():
            other = reference.modules[target]
            assert torch.equal(module.a, other.a) and torch.equal(module.b, other.b)
            assert module.scale == pytest.approx(other.scale, rel=1e-6)


def test_one_contiguous_buffer(sd15_targets, sd15_lora, tmp_path):
    write_lora(sd15_lora, tmp_path / "a.safetensors", "peft")
    adapter = load_lora(tmp_path / "a.safetensors", "a", sd15_targets)
    assert adapter.buffer.is_contiguous() and adapter.buffer.ndim == 1
    storage = adapter.buffer.untyped_storage().data_ptr()
    factor_bytes = 0
    for module in adapter.modules.values():
        for factor in (module.a, module.b):
            assert factor.untyped_storage().data_ptr() == storage
            factor_bytes += factor.numel() * factor.element_size()
    # The buffer holds exactly the factors: no padding, no gaps, no overlap.
    assert adapter.nbytes == factor_bytes == adapter.buffer.numel() * 4
    spans = sorted(
        (m.a.data_ptr(), m.a.data_ptr() + m.a.numel() * 4) for m in adapter.modules.values()
    ) + sorted((m.b.data_ptr(), m.b.data_ptr() + m.b.numel() * 4) for m in adapter.modules.values())
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_move_rebuilds_views(sd15_targets, sd15_lora, tmp_path):
    write_lora(sd15_lora, tmp_path / "a.safetensors", "peft")
    adapter = load_lora(tmp_path / "a.safetensors", "a", sd15_targets)
    half = adapter.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.nbytes == adapter.nbytes // 2
    for target, module in half.modules.items():
        assert module.a.untyped_storage().data_ptr() == half.buffer.untyped_storage().data_ptr()
        torch.testing.assert_close(module.a.float(), adapter.modules[target].a, rtol=1e-3, atol=1e-3)
    assert adapter.to(dtype=torch.float32) is adapter


def test_bytes_source_and_serving_dtype(sd15_targets, sd15_lora, tmp_path):
    path = tmp_path / "a.safetensors"
    write_lora(sd15_lora, path, "kohya")
    from_path = load_lora(path, "a", sd15_targets)
    from_bytes = load_lora(path.read_bytes(), "a", sd15_targets, dtype=torch.bfloat16)
    assert from_bytes.dtype == torch.bfloat16
    assert torch.allclose(from_bytes.buffer.float(), from_path.buffer, rtol=1e-2, atol=1e-2)


def test_adapter_summary(sdxl_targets, sdxl_lora, tmp_path):
    write_lora(sdxl_lora, tmp_path / "a.safetensors", "kohya_sgm")
    adapter = load_lora(tmp_path / "a.safetensors", "a", sdxl_targets)
    assert isinstance(adapter, LoRAAdapter) and adapter.kind == "lora" and adapter.name == "a"
    assert adapter.components == ("text_encoder", "text_encoder_2", "unet")
    assert adapter.max_rank == 4 and not adapter.is_slider


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({}, False),
        ({"prompts": '{"target": "person"}', "config": '{"network": {"rank": 4}}'}, True),
        ({"sdserve_slider": "true"}, True),
        ({"prompts": "x"}, False),
    ],
)
def test_slider_tagging(sd15_targets, sd15_lora, tmp_path, metadata, expected):
    """Concept Sliders are kohya-layout LoRAs told apart by their trainer's metadata."""
    write_lora(sd15_lora, tmp_path / "s.safetensors", "kohya", extra_metadata=metadata)
    adapter = load_lora(tmp_path / "s.safetensors", "s", sd15_targets)
    assert adapter.is_slider is expected
    assert load_lora(tmp_path / "s.safetensors", "s", sd15_targets, is_slider=True).is_slider


def _single_module_file(tmp_path, down, up, alpha=None):
    import safetensors.torch

    tensors = {"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up}
    if alpha is not None:
        tensors["lora_unet_conv_in.alpha"] = torch.tensor(alpha)
    path = tmp_path / "one.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(("alpha", "scale"), [(None, 1.0), (0.0, 1.0), (2.0, 0.5), (-4.0, -1.0)])
def test_kohya_alpha_rules(sd15_targets, tmp_path, alpha, scale):
    """No .alpha, or alpha 0, means alpha = rank (kohya's rule); conv LoRA (LoCon) shapes."""
    spec = sd15_targets["unet.conv_in"]
    assert spec == TargetSpec("conv", 4, 32, (3, 3), (1, 1), (1, 1))
    down = torch.randn(4, 4, 3, 3)  # [r, in, kh, kw]
    up = torch.randn(32, 4, 1, 1)  # [out, r, 1, 1]
    adapter = load_lora(_single_module_file(tmp_path, down, up, alpha), "one", sd15_targets)
    module = adapter.modules["unet.conv_in"]
    assert module.scale == pytest.approx(scale)
    expected = scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    torch.testing.assert_close(module.delta_weight(), expected, rtol=1e-5, atol=1e-5)


def test_targets_of_lists_linear_and_conv():
    unet = tiny_unet()
    targets = targets_of({"unet": unet})
    layers = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert sorted(targets) == sorted(f"unet.{n}" for n in layers)
    assert targets["unet.time_embedding.linear_1"] == TargetSpec("linear", 32, 128)
    down = targets["unet.down_blocks.0.downsamplers.0.conv"]
    assert (down.kind, down.stride, down.kernel_size) == ("conv", (2, 2), (3, 3))


def test_one_by_one_factors_on_linear_and_matrix_factors_on_one_by_one_conv(sd15_targets, sdxl_targets, tmp_path):
    """proj_in is a 1x1 conv in SD 1.x and a linear in SDXL; files of either shape fit both."""
    import safetensors.torch

    down, up = torch.randn(2, 64), torch.randn(64, 2)  # [r, in], [out, r]
    for targets, target in (
        (sd15_targets, "unet.down_blocks.1.attentions.0.proj_in"),
        (sdxl_targets, "unet.down_blocks.1.attentions.0.proj_in"),
    ):
        for d, u in ((down, up), (down[:, :, None, None], up[:, :, None, None])):
            path = tmp_path / "p.safetensors"
            safetensors.torch.save_file({f"{target}.lora_A.weight": d.contiguous(), f"{target}.lora_B.weight": u.contiguous()}, str(path))
            module = load_lora(path, "p", targets).modules[target]
            expected = (up @ down).reshape(module.delta_weight().shape)
            torch.testing.assert_close(module.delta_weight(), expected)

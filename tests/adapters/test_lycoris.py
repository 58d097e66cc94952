"""LoHa and LoKr files load as the exact LoRA form of each module: checked against lycoris-lora's own
weight computation of the same file and against the definitions in `kernels.lycoris_reference`;
bad files are refused with a typed error naming the key."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from sdserve.adapters import load_lora
from sdserve.errors import AdapterError
from sdserve.kernels.lycoris_reference import loha_delta, lokr_delta, lokr_linear
from tests.adapters.lora_factory import kohya_file_contents
from tests.adapters.lycoris_factory import lora_name, lycoris_deltas, lycoris_modules, make_lycoris

NAME = "tenant-a/lyco"
MID = "unet.mid_block"
ATTN = f"{MID}.attentions.0.transformer_blocks.0"

# Every layout LyCORIS writes, at ranks where the factorization is served and where dense is
# (64-wide modules: a LoHa of dim 8 has rank 64 = min(out, in), served dense), alpha != dim.
PLAN = {
    f"{ATTN}.attn1.to_q": ("loha", {"lora_dim": 4, "alpha": 3.0}),
    f"{ATTN}.attn1.to_k": ("loha", {"lora_dim": 8, "alpha": 3.0}),
    f"{MID}.resnets.0.conv1": ("loha", {"lora_dim": 2, "alpha": 1.0}),
    f"{MID}.resnets.0.conv2": ("loha", {"lora_dim": 2, "alpha": 1.5, "use_tucker": True}),
    f"{MID}.resnets.0.time_emb_proj": ("loha", {"lora_dim": 3, "alpha": 0.0}),  # alpha 0 means dim
    f"{ATTN}.attn1.to_v": ("lokr", {"lora_dim": 2, "alpha": 1.0}),
    f"{ATTN}.ff.net.2": ("lokr", {"lora_dim": 2, "alpha": 1.0, "decompose_both": True, "factor": 4}),
    f"{MID}.resnets.1.conv1": ("lokr", {"lora_dim": 2, "alpha": 3.0, "use_tucker": True, "factor": 4}),
    f"{MID}.resnets.1.conv2": ("lokr", {"lora_dim": 2, "alpha": 3.0, "factor": 4}),
    f"{ATTN}.attn1.to_out.0": ("lokr", {"lora_dim": 2, "alpha": 5.0, "full_matrix": True}),  # scale 1
    "text_encoder.encoder.layers.0.self_attn.q_proj": ("loha", {"lora_dim": 2, "alpha": 2.0}),
}
EXPECTED_FORMS = {
    f"{ATTN}.attn1.to_q": ("factorized", 16), f"{ATTN}.attn1.to_k": ("dense", 64),
    f"{MID}.resnets.0.conv2": ("factorized", 4), f"{ATTN}.attn1.to_out.0": ("dense", 64),
    f"{ATTN}.attn1.to_v": ("factorized", 16), f"{MID}.resnets.1.conv1": ("factorized", 8),
}


@pytest.fixture(scope="module")
def lyco(sd15_components):
    return make_lycoris(sd15_components, PLAN, seed=1)


def _load(tensors, targets, **kwargs):
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    return load_lora(safetensors.torch.save(tensors), NAME, targets, **kwargs)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_served_delta_equals_lycoris_and_the_definition(lyco, sd15_components, sd15_targets):
    adapter = _load(lyco, sd15_targets)
    assert set(adapter.lycoris) == set(PLAN) == set(adapter.modules)
    expected = lycoris_deltas(sd15_components, lyco)
    for target, (kind, _) in PLAN.items():
        module, info = adapter.modules[target], adapter.lycoris[target]
        served = module.delta_weight()
        assert info.kind == kind and served.abs().max() > 0
        assert _relative(served, expected[target].reshape(served.shape)) < 1e-5, target
        assert _relative(served, _definition(lyco, target, tuple(served.shape))) < 1e-5, target
    for target, (form, rank) in EXPECTED_FORMS.items():
        assert (adapter.lycoris[target].form, adapter.modules[target].rank) == (form, rank), target
    assert adapter.lycoris[f"{ATTN}.attn1.to_out.0"].scale == 1.0  # both LoKr halves whole: alpha ignored
    assert adapter.lycoris[f"{MID}.resnets.0.time_emb_proj"].scale == 1.0


def _definition(lyco, target: str, shape: tuple[int, ...], name: str | None = None) -> torch.Tensor:
    """ΔW from the file's tensors by the definitions in kernels.lycoris_reference, with the scale
    rule written out: alpha / dim (alpha 0 -> dim), and 1 for a LoKr of two whole halves."""
    prefix = (name or lora_name(target)) + "."
    get = {key.split(".", 1)[1]: value for key, value in lyco.items() if key.startswith(prefix)}.get
    alpha = float(get("alpha"))
    if get("hada_w1_a") is not None:
        dim = get("hada_w1_b").shape[0]
        scale = (alpha or dim) / dim
        return loha_delta(get("hada_w1_a"), get("hada_w1_b"), get("hada_w2_a"), get("hada_w2_b"), shape, scale,
                          get("hada_t1"), get("hada_t2"))
    w1 = get("lokr_w1") if get("lokr_w1") is not None else get("lokr_w1_a") @ get("lokr_w1_b")
    if get("lokr_w2") is not None:
        w2, scale = get("lokr_w2"), 1.0 if get("lokr_w1") is not None else alpha / get("lokr_w1_b").shape[0]
    elif get("lokr_t2") is not None:
        w2 = torch.einsum("ijkl,ip,jq->pqkl", get("lokr_t2"), get("lokr_w2_a"), get("lokr_w2_b"))
        scale = alpha / get("lokr_t2").shape[0]
    else:
        w2 = get("lokr_w2_a") @ get("lokr_w2_b")
        scale = alpha / get("lokr_w2_b").shape[0]
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    return lokr_delta(w1, w2, scale).reshape(shape)


def test_sdxl_kohya_names(sdxl_components, sdxl_targets):
    """SDXL files as kohya/LyCORIS write them: "lora_te1_"/"lora_te2_", the original UNet's block names."""
    from sdserve.adapters.formats.sgm import sgm_aliases

    to_q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "unet.down_blocks.1.resnets.0.conv1"
    te1 = "text_encoder.encoder.layers.0.self_attn.k_proj"
    te2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj"
    sgm = {path: alias for alias, path in sgm_aliases([t.partition(".")[2] for t in sdxl_targets
                                                        if t.startswith("unet.")]).items()}
    names = {target: "lora_unet_" + sgm[target.partition(".")[2]].replace(".", "_") for target in (to_q, conv)}
    names |= {te1: "lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
              te2: "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"}
    plan = {to_q: ("loha", {"lora_dim": 2, "alpha": 1.0}), te1: ("loha", {"lora_dim": 3, "alpha": 2.0}),
            conv: ("lokr", {"lora_dim": 2, "alpha": 1.0, "factor": 4, "use_tucker": True}),
            te2: ("lokr", {"lora_dim": 2, "alpha": 4.0, "decompose_both": True, "factor": 4})}
    lyco = make_lycoris(sdxl_components, plan, seed=4, names=names)
    assert any(key.startswith("lora_unet_input_blocks_") for key in lyco)
    adapter = _load(lyco, sdxl_targets)
    assert set(adapter.lycoris) == set(plan)
    for target in plan:
        served = adapter.modules[target].delta_weight()
        assert _relative(served, _definition(lyco, target, tuple(served.shape), names[target])) < 1e-5, target


def test_lycoris_merge_of_a_unit_scale_file(sd15_components, sd15_targets):
    """lycoris-lora's own merge (`get_merged_weight`) at alpha = dim. At other alphas its 4.1.3 merge
    multiplies by alpha/dim twice while its forward pass (and A1111, ComfyUI) do once; sdserve
    follows the forward pass, checked above."""
    plan = {target: (kind, {**kwargs, "alpha": kwargs["lora_dim"]}) for target, (kind, kwargs) in PLAN.items()
            if "use_tucker" not in kwargs or kind == "loha"}  # 4.1.3 cannot rebuild its Tucker LoKr
    lyco = make_lycoris(sd15_components, plan, seed=2)
    adapter = _load(lyco, sd15_targets)
    with torch.no_grad():
        for target, module in lycoris_modules(sd15_components, lyco).items():
            merged, _ = module.get_merged_weight(1.0, module.org_weight.shape)
            expected = merged.double() - module.org_weight.double()
            served = adapter.modules[target].delta_weight()
            assert _relative(served, expected.reshape(served.shape)) < 1e-4, target


def test_mixed_with_lora_pairs_and_half_precision(lyco, sd15_lora, sd15_targets):
    """A file mixing LoRA pairs and LyCORIS modules (LyCORIS presets pick per module), fp16 on disk."""
    tensors, _ = kohya_file_contents(sd15_lora)
    ours = {key.split(".")[0] for key in lyco}
    tensors = {key: value for key, value in tensors.items()
               if key.split(".")[0].replace("lora_te_text_model_", "lora_te_") not in ours}
    mixed = {**tensors, **{key: value.half() for key, value in lyco.items()}}
    lora_only = _load(tensors, sd15_targets)
    adapter = _load(mixed, sd15_targets, dtype=torch.float16)
    assert adapter.dtype == torch.float16
    for target, module in lora_only.modules.items():
        if target not in adapter.lycoris:
            assert _relative(adapter.modules[target].delta_weight(), module.delta_weight()) < 1e-2
    assert set(adapter.lycoris) == set(PLAN) and len(adapter.modules) > len(PLAN)
    half = {key: value.half().float() for key, value in lyco.items()}
    reference = _load(half, sd15_targets)
    for target in adapter.lycoris:
        assert _relative(adapter.modules[target].delta_weight(), reference.modules[target].delta_weight()) < 1e-2


def test_lokr_applied_by_reshape_equals_the_kron():
    generator = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 5, generator=generator), torch.randn(6, 3, generator=generator)
    x = torch.randn(7, 15, generator=generator)
    expected = x.double() @ lokr_delta(w1, w2, 0.5).t()
    assert torch.allclose(lokr_linear(x, w1, w2, 0.5), expected, rtol=1e-12, atol=1e-12)


# --- bad files ---------------------------------------------------------------------------------

TO_Q = lora_name(f"{ATTN}.attn1.to_q")
CONV = lora_name(f"{MID}.resnets.1.conv2")
TUCKER = lora_name(f"{MID}.resnets.0.conv2")


def _bad(lyco, change):
    tensors = {key: value.clone() for key, value in lyco.items()}
    change(tensors)
    return tensors


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        (lambda t: t.update({f"{TO_Q}.hada_w1_b": torch.ones(4, 65)}), f"{TO_Q}.hada_w1_b", "shape [4, 65]"),
        (lambda t: t.pop(f"{TO_Q}.hada_w2_a"), f"{TO_Q}.", "no matching 'hada_w2_a'"),
        (lambda t: t.pop(f"{TUCKER}.hada_t2"), f"{TUCKER}.", "no matching 'hada_t2'"),
        (lambda t: t[f"{TO_Q}.hada_w2_b"].__setitem__((0, 0), float("nan")), f"{TO_Q}.hada_w2_b", "NaN"),
        (lambda t: t[f"{CONV}.lokr_w2_b"].__setitem__((1, 3), float("inf")), f"{CONV}.lokr_w2_b", "infinite"),
        (lambda t: t.pop(f"{CONV}.lokr_w2_b"), f"{CONV}.lokr_w2_a", "no matching 'lokr_w2_b'"),
        (lambda t: t.pop(f"{CONV}.lokr_w1"), f"{CONV}.", "no matching 'lokr_w1'"),
        (lambda t: t.update({f"{CONV}.lokr_w1": torch.ones(3, 4)}), f"{CONV}.lokr_w1", "does not divide"),
        (lambda t: t.update({f"{CONV}.lokr_w2": torch.ones(16, 16, 3, 3)}), f"{CONV}.lokr_w2", "whole or factored"),
        (lambda t: t.update({f"{CONV}.lokr_t1": torch.ones(2, 2, 3, 3)}), f"{CONV}.lokr_t1", "unexpected key"),
        (lambda t: t.update({f"{CONV}.lokr_w2_b": torch.ones(2, 16, 3, 1)}), f"{CONV}.lokr_w2_b", "shape"),
        (lambda t: t.update({f"{TO_Q}.lora_down.weight": torch.ones(2, 64)}), f"{TO_Q}.", "holds loha and lora"),
        (lambda t: t.update({f"{TO_Q}.alpha": torch.tensor(1e9)}), f"{TO_Q}.", "beyond the limit"),
        (lambda t: t.update({f"{TO_Q}.hada_w1_a": torch.ones(64, 4, dtype=torch.int32)}), f"{TO_Q}.hada_w1_a",
         "dtype int32"),
    ],
)
def test_bad_files_name_the_key(lyco, sd15_targets, change, key, problem):
    with pytest.raises(AdapterError) as info:
        _load(_bad(lyco, change), sd15_targets)
    assert type(info.value) is AdapterError and info.value.adapter_name == NAME
    assert key in info.value.problem and problem in info.value.problem, info.value.problem


def test_ranks_beyond_the_limit_and_wrong_family(lyco, sd15_components, sd15_targets, sdxl_targets):
    with pytest.raises(AdapterError, match=r"\.hada_w1_a': rank \d exceeds the maximum of 3"):
        _load(lyco, sd15_targets, max_rank=3)
    # A served rank above max_rank is fine: to_k's LoHa of dims 8 and 8 is served at rank 64.
    assert _load(lyco, sd15_targets, max_rank=8).modules[f"{ATTN}.attn1.to_k"].rank == 64
    # Cross-attention keys read the text encoder's width: 32 in tiny SD 1.x, 64 in tiny SDXL.
    to_k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    cross = make_lycoris(sd15_components, {to_k: ("loha", {"lora_dim": 2, "alpha": 1.0})}, seed=3)
    assert _load(cross, sd15_targets).lycoris[to_k].kind == "loha"
    with pytest.raises(AdapterError, match=f"'{lora_name(to_k)}.hada_w1_b': shape \\[2, 32\\], the base model's "
                                           f"module needs \\[2, 64\\]"):
        _load(cross, sdxl_targets)

"""`compile fuse|unfuse`: the fused model serves the per-request stack's image, its weights are
the base plus PEFT's own deltas, the base dir is untouched, and unfusing gives the base back."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.request import AdapterSpec, EmbeddingSpec
from tests.compile.conftest import MODEL, base_dir, run_cli, tree_digest
from tests.engine.oracle import max_pixel_difference

SCALE_A, SCALE_B = 0.7, -1.3  # a negative scale too: a slider reversed


@pytest.fixture(scope="module")
def fused(adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "model"
    before = tree_digest(base_dir())
    from sdserve.cli.main import main

    code = main(["compile", "fuse", "--model", MODEL, "--lora", f"{adapters['a']}:{SCALE_A}",
                 "--lora", f"{adapters['b']}:{SCALE_B}", "--embedding", str(adapters["toy"]),
                 "--out", str(out), "--no-progress"])
    assert code == 0
    return {"out": out, "base_before": before}


def test_base_directory_is_byte_identical_after_fuse(fused):
    assert tree_digest(base_dir()) == fused["base_before"]


def _weights(model_dir, component):
    if component == "unet":
        return dict(UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").named_parameters())
    return dict(CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").named_parameters())


def test_fused_weights_are_base_plus_peft_deltas(fused, adapters):
    """Against PEFT's get_delta_weight per module (the factory's oracle), LoCon convs included."""
    checked = 0
    for component in ("unet", "text_encoder"):
        base, ours = _weights(base_dir(), component), _weights(fused["out"], component)
        expected = {name: weight.detach().clone() for name, weight in base.items()}
        for lora, scale in ((adapters["a_lora"], SCALE_A), (adapters["b_lora"], SCALE_B)):
            for target, delta in lora.deltas.items():
                if target.startswith(component + "."):
                    name = target.removeprefix(component + ".") + ".weight"
                    expected[name] += scale * delta.reshape(expected[name].shape)
                    checked += 1
        for name, weight in ours.items():
            if name.endswith("token_embedding.weight"):
                weight = weight[: expected[name].shape[0]]  # the added token's row is checked below
            torch.testing.assert_close(weight.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert checked > 50
    assert any(t.endswith("conv1") for t in adapters["b_lora"].deltas)  # LoCon convs were among them


def test_fused_model_serves_the_image_of_the_per_request_stack(fused, adapters):
    engine = Engine(EngineConfig())
    common = dict(prompt="a photo of <toy> on a red circle", seed=11, steps=4, guidance_scale=7.5)
    stack = (AdapterSpec(path=str(adapters["a"]), scale=SCALE_A), AdapterSpec(path=str(adapters["b"]), scale=SCALE_B))
    per_request = RequestSpec(model=MODEL, adapters=stack, embeddings=(EmbeddingSpec(path=str(adapters["toy"])),),
                              **common)
    want = engine.generate([engine.validate(per_request)])[0].images[0]
    got = engine.generate([engine.validate(RequestSpec(model=str(fused["out"]), **common))])[0].images[0]
    base = engine.generate([engine.validate(RequestSpec(model=MODEL, **common))])[0].images[0]
    assert max_pixel_difference(got, want) <= 2
    assert max_pixel_difference(base, want) > 2  # the stack does change the image


def test_unfuse_gives_the_base_back_within_float32_rounding(fused, adapters, tmp_path, capsys):
    out = tmp_path / "unfused"
    code, stdout, stderr = run_cli(capsys, "compile", "unfuse", "--model", str(fused["out"]),
                                   "--lora", f"{adapters['b']}:{SCALE_B}", "--lora", f"{adapters['a']}:{SCALE_A}",
                                   "--out", str(out), "--no-progress")
    assert code == 0, stderr
    assert "max relative error against tiny-sd1" in stdout
    reported = float(stdout.split("max relative error against tiny-sd1: ")[1].split(";")[0])
    worst = 0.0
    for component in ("unet", "text_encoder"):
        base, back = _weights(base_dir(), component), _weights(out, component)
        for name, weight in base.items():
            ours = back[name].detach()[: weight.shape[0]]
            worst = max(worst, float((ours - weight).abs().max() / weight.abs().max().clamp(min=1e-30)))
    assert worst <= 1e-6  # a few float32 ulps, not the stack's size
    assert worst == pytest.approx(reported, rel=1e-3, abs=1e-12)


def test_unfuse_refuses_another_stack(fused, adapters, tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "compile", "unfuse", "--model", str(fused["out"]),
                              "--lora", f"{adapters['a']}:{SCALE_A}", "--out", str(tmp_path / "u"))
    assert code == 2 and stderr.count("\n") == 1
    assert "unfuse takes the same files at the same scales" in stderr
    assert not (tmp_path / "u").exists()


def test_sdxl_fuse_covers_both_text_encoders(tmp_path):
    """tiny-sdxl: a LoRA on the UNet (LoCon convs too) and both text encoders, and a clip_l/clip_g
    embedding added to both tokenizers and token tables."""
    import safetensors.torch

    from sdserve.compile.fused_model import FuseConfig, fuse_model
    from sdserve.compile.source import EmbeddingArg, LoRAArg
    from tests.engine.lora_cases import UNET_ATTENTION, UNET_CONV, write_model_lora

    lora = write_model_lora("tiny-sdxl", tmp_path, "xl", rank=4, alpha=4.0, text_encoder=True,
                            unet_targets=UNET_ATTENTION + UNET_CONV, seed=3)
    generator = torch.Generator().manual_seed(1)
    embedding = tmp_path / "xl-emb.safetensors"
    safetensors.torch.save_file({"clip_l": torch.randn(1, 32, generator=generator),
                                 "clip_g": torch.randn(1, 32, generator=generator)}, embedding)
    result = fuse_model(FuseConfig(model="tiny-sdxl", out=tmp_path / "fused", progress=False,
                                   loras=(LoRAArg(lora, 0.8),), embeddings=(EmbeddingArg(embedding, "<xl>"),)))
    assert result.tokens == ("<xl>",)
    engine = Engine(EngineConfig())
    common = dict(prompt="a <xl> on a red circle", negative_prompt="blurry", seed=3, steps=3)
    per_request = RequestSpec(model="tiny-sdxl", adapters=(AdapterSpec(path=str(lora), scale=0.8),),
                              embeddings=(EmbeddingSpec(path=str(embedding), token="<xl>"),), **common)
    want = engine.generate([engine.validate(per_request)])[0].images[0]
    got = engine.generate([engine.validate(RequestSpec(model=str(result.out), **common))])[0].images[0]
    base = engine.generate([engine.validate(RequestSpec(model="tiny-sdxl", **common))])[0].images[0]
    assert max_pixel_difference(got, want) <= 2
    assert max_pixel_difference(base, want) > 2


def test_loha_and_lokr_fuse_to_lycoris_own_deltas(tmp_path):
    """LyCORIS LoHa (Tucker convs too) and LoKr files fold to W + s·ΔW with ΔW as lycoris-lora
    computes it from the file (the adapters package serves them as their exact LoRA form)."""
    import safetensors.torch

    pytest.importorskip("lycoris")
    from sdserve.adapters.targets import targets_of
    from sdserve.compile.fused_model import FuseConfig, fuse_model
    from sdserve.compile.source import LoRAArg
    from tests.adapters.lycoris_factory import lycoris_deltas, make_lycoris
    from tests.engine.lora_cases import model_components

    components = model_components(MODEL)
    targets = targets_of(components)
    plans = {
        "loha": {t: ("loha", {"lora_dim": 2, "alpha": 1.0, "use_tucker": t.endswith("conv2")})
                 for t in targets if t.endswith(("to_q", "conv2", "self_attn.k_proj"))},
        "lokr": {t: ("lokr", {"lora_dim": 2, "alpha": 1.0, "factor": 4})
                 for t in targets if t.endswith(("to_k", "conv1"))},
    }
    files, deltas = [], {}
    for seed, (kind, plan) in enumerate(plans.items()):
        state = make_lycoris(components, plan, seed=seed, std=0.5)
        path = tmp_path / f"{kind}.safetensors"
        safetensors.torch.save_file(state, path)
        files.append(path)
        deltas[kind] = lycoris_deltas(components, state)
    scales = {"loha": 0.8, "lokr": -0.6}
    out = fuse_model(FuseConfig(model=MODEL, out=tmp_path / "fused", progress=False,
                                loras=tuple(LoRAArg(path, scales[path.stem]) for path in files))).out
    for component in ("unet", "text_encoder"):
        base, fused = _weights(base_dir(), component), _weights(out, component)
        expected = {name: weight.detach().clone() for name, weight in base.items()}
        for kind, kind_deltas in deltas.items():
            for target, delta in kind_deltas.items():
                if target.startswith(component + "."):
                    name = target.removeprefix(component + ".") + ".weight"
                    expected[name] += scales[kind] * delta.reshape(expected[name].shape)
        for name, weight in fused.items():
            torch.testing.assert_close(weight.detach(), expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert sum(len(d) for d in deltas.values()) > 10

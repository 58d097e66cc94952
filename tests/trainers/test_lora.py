"""The LoRA method: step 0 is the base model; a trained file loads in sdserve and in diffusers,
and all three (the trainer's own forward, diffusers' load_lora_weights, sdserve's adapter)
give the same UNet output. diffusers is the oracle (ARCHITECTURE rule 5)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import safetensors
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.lora import LoraLayer

from sdserve.adapters import load_lora, targets_of
from sdserve.models.builtin import builtin_path
from sdserve.trainers.components import Components
from sdserve.trainers.data import load_folder
from sdserve.trainers.loop import LoopConfig, train
from sdserve.trainers.lora import LoRAConfig, LoRAMethod

CFG = LoopConfig(steps=3, lr=1e-2, batch_size=2, progress=False)
CAPTIONS = ["a photo of sks dog 0", "a red circle"]


def _inputs(components: Components) -> tuple[torch.Tensor, torch.Tensor]:
    side = components.resolution // components.vae_scale_factor
    noisy = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(3))  # [2, 4, h, w]
    return noisy, torch.tensor([10, 700])


def _merged(components: Components, adapter) -> Components:
    """sdserve's reading of the file, applied the plainest way: each module's scale·B@A added to
    a copy of its base weight."""
    merged = replace(components, unet=copy.deepcopy(components.unet),
                     text_encoders=[copy.deepcopy(t) for t in components.text_encoders])
    modules = merged.adapter_components()
    with torch.no_grad():
        for target, module in adapter.modules.items():
            component, _, path = target.partition(".")
            modules[component].get_submodule(path).weight += module.delta_weight()
    return merged


def test_step_zero_is_the_base_model(sd1):
    noisy, timesteps = _inputs(sd1)
    with torch.no_grad():
        base = sd1.predict(noisy, timesteps, sd1.encode_text(CAPTIONS))
        method = LoRAMethod(sd1, LoRAConfig(rank=4, text_encoder=True, unet_targets=("attn", "ff", "proj")))
        assert torch.equal(method.predict(noisy, timesteps, CAPTIONS), base)
        method.remove()
        assert torch.equal(sd1.predict(noisy, timesteps, sd1.encode_text(CAPTIONS)), base)
    assert all(torch.count_nonzero(layer.up) == 0 for layer in method.layers.values())
    assert all(torch.count_nonzero(layer.down) > 0 for layer in method.layers.values())


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_trained_lora_gives_the_same_unet_output_in_the_trainer_diffusers_and_sdserve(
    sd1, folder, tmp_path, layout
):
    targets = targets_of(sd1.adapter_components())
    base = replace(sd1, unet=copy.deepcopy(sd1.unet), text_encoders=[copy.deepcopy(t) for t in sd1.text_encoders])
    config = LoRAConfig(rank=4, alpha=2.0, text_encoder=True, unet_targets=("attn", "ff", "proj", "conv"), format=layout)
    method = LoRAMethod(sd1, config)
    initial = {t: layer.down.detach().clone() for t, layer in method.layers.items()}
    out = tmp_path / "lora.safetensors"
    result = train(method, sd1, load_folder(folder, 32), CFG, out)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(torch.count_nonzero(layer.up) > 0 for layer in method.layers.values())
    assert any(not torch.equal(layer.down, initial[t]) for t, layer in method.layers.items())

    noisy, timesteps = _inputs(sd1)
    with torch.no_grad():
        ours = method.predict(noisy, timesteps, CAPTIONS)  # [2, 4, 16, 16]
        untrained = base.predict(noisy, timesteps, base.encode_text(CAPTIONS))

        adapter = load_lora(out, "trained", targets)
        assert adapter.layout == ("kohya" if layout == "kohya" else "peft")
        assert set(adapter.modules) == set(method.layers)
        assert {m.rank for m in adapter.modules.values()} == {4}
        assert {m.scale for m in adapter.modules.values()} == {0.5}
        served = _merged(base, adapter)
        sdserve_output = served.predict(noisy, timesteps, served.encode_text(CAPTIONS))

        pipe = StableDiffusionPipeline.from_pretrained(builtin_path("tiny-sd1"))
        pipe.load_lora_weights(str(out), adapter_name="trained")
        ids = base.tokenize(CAPTIONS)
        diffusers_output = pipe.unet(noisy, timesteps, pipe.text_encoder(ids)[0]).sample

    assert (ours - untrained).abs().max() > 1e-3  # the comparison below is not of two base models
    torch.testing.assert_close(diffusers_output, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sdserve_output, ours, rtol=1e-4, atol=1e-5)


def test_metadata_and_kohya_keys(sd1, folder, tmp_path):
    out = tmp_path / "k.safetensors"
    config = LoRAConfig(rank=2, alpha=1.0, text_encoder=True, format="kohya")
    train(LoRAMethod(sd1, config), sd1, load_folder(folder, 32), CFG, out)
    with safetensors.safe_open(str(out), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        alpha = handle.get_tensor("lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha")
    assert "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert float(alpha) == 1.0
    assert metadata["sdserve_method"] == "lora" and metadata["sdserve_base_model"] == "tiny-sd1"
    assert metadata["sdserve_base_model_sha256"] == sd1.digest and len(sd1.digest) == 64
    assert metadata["sdserve_rank"] == "2" and metadata["sdserve_alpha"] == "1"
    assert metadata["sdserve_steps"] == "3" and metadata["sdserve_trigger_tokens"] == "a,photo,of,sks,dog"
    assert metadata["ss_network_dim"] == "2" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["sdserve_version"]


def test_sdxl_lora_loads_in_diffusers_and_sdserve_with_the_trained_deltas(components_of, tmp_path):
    from tests.trainers.conftest import write_folder

    components = components_of("tiny-sdxl")
    targets = targets_of(components.adapter_components())
    method = LoRAMethod(components, LoRAConfig(rank=2, alpha=3.0, text_encoder=True))
    out = tmp_path / "xl.safetensors"
    train(method, components, load_folder(write_folder(tmp_path / "d", count=2), 32), CFG, out)
    adapter = load_lora(out, "xl", targets)
    assert {t.partition(".")[0] for t in adapter.modules} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = StableDiffusionXLPipeline.from_pretrained(builtin_path("tiny-sdxl"), add_watermarker=False)
    pipe.load_lora_weights(str(out), adapter_name="xl")
    seen = 0
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for path, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoraLayer) and "xl" in module.lora_A:
                layer = method.layers[f"{component}.{path}"]
                trained = layer.scale * (layer.up @ layer.down).detach()  # [out, in]
                theirs = module.get_delta_weight("xl").reshape(trained.shape)
                torch.testing.assert_close(theirs, trained)
                torch.testing.assert_close(adapter.modules[f"{component}.{path}"].delta_weight(), trained)
                seen += 1
    assert seen == len(method.layers) == len(adapter.modules)

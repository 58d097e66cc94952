"""The hypernetwork method: step 0 is the base model; a trained file loads in sdserve and gives the
trainer's UNet output through the engine's own model (strength 1) and the base model's at
strength 0, and A1111's formula by hand on a plain diffusers UNet (the oracle) agrees; pairs train
on self-attention widths too; SDXL; resume and bytes; the CLI."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F

from sdserve.adapters.hypernetwork import METADATA_KEY, load_hypernetwork
from sdserve.engine.row_context import RowContext
from sdserve.errors import InvalidArgument
from sdserve.trainers.components import Components
from sdserve.trainers.data import load_folder
from sdserve.trainers.hypernetwork import HypernetworkConfig, HypernetworkMethod, attention_widths
from sdserve.trainers.loop import CHECKPOINT_FILE, LoopConfig, train
from sdserve.trainers.output import load_checkpoint
from tests.adapters.test_hypernetwork import hand_forward
from tests.trainers.conftest import write_folder
from tests.trainers.test_textual_inversion import _cli, engine_model, weights_digest

CFG = LoopConfig(steps=3, lr=1e-2, batch_size=2, progress=False)
RELU_NORM = HypernetworkConfig(layer_structure=(1.0, 2.0, 1.0), activation="relu", layer_norm=True)
CAPTIONS = ["a red circle outlined", "a large blue square"]


def _inputs(components: Components) -> tuple[torch.Tensor, torch.Tensor]:
    side = components.resolution // components.vae_scale_factor
    noisy = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(3))  # [2, 4, h, w]
    return noisy, torch.tensor([10, 700])


def _copy(components: Components) -> Components:
    return replace(components, unet=copy.deepcopy(components.unet),
                   text_encoders=[copy.deepcopy(t) for t in components.text_encoders])


def a1111_state(tensors: dict[str, torch.Tensor], width: int, side: str) -> dict[str, torch.Tensor]:
    """The file's MLP in A1111's Sequential naming, as hand_forward walks it: linear i at index
    3i, its LayerNorm at 3i + 2 (the activation between them has no tensors)."""
    state = {}
    for key, tensor in tensors.items():
        _, w, s, layer, param = key.split(".", 4)
        if int(w) == width and s == side:
            index = 3 * int(layer) + (2 if param.startswith("norm.") else 0)
            state[f"linear.{index}.{param.removeprefix('norm.')}"] = tensor
    return state


class HandProcessor:
    """diffusers' attention, with k and v read from A1111's formula computed by hand (float64)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: HypernetworkConfig, strength: float) -> None:
        self.tensors, self.config, self.strength = tensors, config, strength

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # [B, L, width]
        width, c = context.shape[-1], self.config

        def side(name: str) -> torch.Tensor:
            state = a1111_state(self.tensors, width, name)
            return hand_forward(context, state, list(c.layer_structure), c.activation, c.layer_norm,
                                c.activate_output, self.strength).float()

        query, key, value = attn.to_q(hidden_states), attn.to_k(side("k")), attn.to_v(side("v"))
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, inner] -> [B, H, L, d]
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@pytest.mark.parametrize("config", [
    HypernetworkConfig(),
    HypernetworkConfig(layer_structure=(1.0, 1.5, 2.0, 1.0), activation="swish", activate_output=True),
    HypernetworkConfig(activation="sigmoid", layer_norm=True, activate_output=True),
])
def test_step_zero_is_the_base_model(sd1, config):
    noisy, timesteps = _inputs(sd1)
    with torch.no_grad():
        base = sd1.predict(noisy, timesteps, sd1.encode_text(CAPTIONS))
        method = HypernetworkMethod(sd1, config)
        assert torch.equal(method.predict(noisy, timesteps, CAPTIONS), base)
        method.remove()
        assert torch.equal(sd1.predict(noisy, timesteps, sd1.encode_text(CAPTIONS)), base)
    # Not a network of zeros: the first layer's weights are random (biases start at 0, as A1111's).
    first = [t for key, t in method.tensors.items() if key.endswith(".0.weight")]
    assert len(first) == 2 * len(method.widths) and all(torch.count_nonzero(t) == t.numel() for t in first)


def test_trained_file_gives_the_trainer_output_in_the_engine_and_by_hand(sd1, tmp_path):
    folder = write_folder(tmp_path / "d", count=3, caption="a red circle outlined")
    base = _copy(sd1)
    before = weights_digest(sd1)
    processors = {name: type(p) for name, p in sd1.unet.attn_processors.items()}
    method = HypernetworkMethod(sd1, RELU_NORM)
    initial = {key: t.detach().clone() for key, t in method.state_dict().items()}
    out = tmp_path / "hn.safetensors"
    result = train(method, sd1, load_folder(folder, 32), CFG, out)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    changed = {key for key, t in method.state_dict().items() if not torch.equal(t, initial[key])}
    # Width 64 has only self-attention in tiny-sd1 (its text is 32 wide): it trains too.
    assert method.widths == attention_widths(sd1.unet) == [32, 64]
    assert "hypernetwork.64.k.1.norm.weight" in changed and "hypernetwork.32.v.1.norm.weight" in changed

    tensors = safetensors.torch.load_file(str(out))
    with safetensors.safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert set(tensors) == set(initial) and metadata["sdserve_method"] == "hypernetwork"
    assert metadata[METADATA_KEY] == ('{"format": 1, "layer_structure": [1.0, 2.0, 1.0], "activation": "relu", '
                                      '"activate_output": false, "layer_norm": true}')
    model = engine_model("tiny-sd1")
    network = load_hypernetwork(out, "hn", model.info.attention_widths)
    assert sorted(network.modules) == [32, 64] and network.ignored_widths == ()

    noisy, timesteps = _inputs(sd1)
    with torch.no_grad():
        ours = method.predict(noisy, timesteps, CAPTIONS)  # [2, 4, 16, 16]
        states = base.encode_text(CAPTIONS).states
        untrained = base.predict(noisy, timesteps, base.encode_text(CAPTIONS))
        served = {}
        for strength in (1.0, 0.0):
            with model.adapters.rows(RowContext(hypernetworks=[((network, strength),)] * 2)):
                served[strength] = model.unet(noisy, timesteps, states).sample
        base.unet.set_attn_processor(HandProcessor(tensors, RELU_NORM, 1.0))
        by_hand = base.unet(noisy, timesteps, states).sample
    assert (ours - untrained).abs().max() > 1e-3  # the comparisons below are not of two base models
    torch.testing.assert_close(served[1.0], ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(served[0.0], untrained, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_hand, ours, rtol=1e-4, atol=1e-5)

    method.remove()
    assert {name: type(p) for name, p in sd1.unet.attn_processors.items()} == processors
    assert weights_digest(sd1) == before


def test_sdxl_pairs_for_its_attention_widths_load_and_match_the_engine(components_of, tmp_path):
    components = components_of("tiny-sdxl")
    base = _copy(components)
    method = HypernetworkMethod(components, HypernetworkConfig(activation="tanh"))
    out = tmp_path / "xl.safetensors"
    train(method, components, load_folder(write_folder(tmp_path / "d", count=2), 32), replace(CFG, steps=2), out)
    model = engine_model("tiny-sdxl")
    network = load_hypernetwork(out, "xl", model.info.attention_widths)
    assert sorted(network.modules) == method.widths == [64]  # the tiny SDXL UNet's only attention width
    noisy, timesteps = _inputs(components)
    with torch.no_grad():
        ours = method.predict(noisy, timesteps, CAPTIONS)
        conditioning = base.encode_text(CAPTIONS, resolution=32)
        with model.adapters.rows(RowContext(hypernetworks=[((network, 1.0),)] * 2)):
            served = model.unet(noisy, timesteps, conditioning.states, added_cond_kwargs=conditioning.added).sample
        untrained = base.predict(noisy, timesteps, conditioning)
    assert (ours - untrained).abs().max() > 1e-4
    torch.testing.assert_close(served, ours, rtol=1e-5, atol=1e-6)


def _trained(components_of, folder: Path, out: Path, cfg: LoopConfig, config: HypernetworkConfig = RELU_NORM):
    components = components_of("tiny-sd1")
    return train(HypernetworkMethod(components, config, seed=cfg.seed), components, load_folder(folder, 32), cfg, out)


def test_resume_is_exact_and_the_same_seed_gives_the_same_bytes(components_of, tmp_path):
    folder = write_folder(tmp_path / "d", count=3)
    cfg = replace(CFG, steps=4)
    straight = _trained(components_of, folder, tmp_path / "a.safetensors", cfg)
    again = _trained(components_of, folder, tmp_path / "b.safetensors", cfg)
    other_seed = _trained(components_of, folder, tmp_path / "c.safetensors", replace(cfg, seed=1))
    assert straight.out.read_bytes() == again.out.read_bytes() != other_seed.out.read_bytes()
    half = _trained(components_of, folder, tmp_path / "d.safetensors", replace(cfg, steps=2))
    assert load_checkpoint(half.state_dir / CHECKPOINT_FILE)["step"] == 2
    resumed = _trained(components_of, folder, tmp_path / "d.safetensors", replace(cfg, resume=half.state_dir))
    assert resumed.losses == straight.losses[2:]
    assert resumed.out.read_bytes() == straight.out.read_bytes()
    with pytest.raises(InvalidArgument, match="--resume"):  # another layer structure
        _trained(components_of, folder, tmp_path / "e.safetensors", replace(cfg, resume=half.state_dir),
                 replace(RELU_NORM, layer_structure=(1.0, 1.0)))


def test_cli_trains_a_file_that_sdserve_generate_uses(capsys, tmp_path):
    folder = write_folder(tmp_path / "d", count=2)
    out = tmp_path / "hn.safetensors"
    code, stdout, stderr = _cli(capsys, "train", "hypernetwork", "--no-progress", "--model", "tiny-sd1",
                                "--data", str(folder), "--out", str(out), "--layer-structure", "1,2,1",
                                "--activation", "relu", "--layer-norm", "--steps", "2")
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out} (hypernetwork, 2 steps")
    image = tmp_path / "hn.png"
    code, _, stderr = _cli(capsys, "generate", "--model", "tiny-sd1", "--prompt", "a red circle",
                           "--hypernetwork", f"{out}:0.8", "--steps", "2", "--out", str(image), "--quiet")
    assert code == 0, stderr
    assert image.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("flags", "named", "says"),
    [
        (["--activation", "nope"], "--activation", "unknown activation 'nope'"),
        (["--layer-structure", "2,2,1"], "--layer-structure", "starting and ending with 1"),
        (["--layer-structure", "1"], "--layer-structure", "2 to 17 sizes"),
        (["--layer-structure", "1,x,1"], "--layer-structure", "comma-separated numbers"),
        (["--layer-structure", "1,17,1"], "--layer-structure", "(0, 16]"),
        (["--layer-structure", "1,0.01,1"], "--layer-structure", "0 units"),  # int(32 · 0.01) = 0
        (["--activation", "sigmoid", "--activate-output"], "--activate-output", "--layer-norm"),
        (["--lr", "nan"], "--lr", "positive"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(capsys, tmp_path, flags, named, says):
    folder = write_folder(tmp_path / "d", count=1)
    out = tmp_path / "o.safetensors"
    code, _, stderr = _cli(capsys, "train", "hypernetwork", "--no-progress", "--model", "tiny-sd1",
                           "--data", str(folder), "--out", str(out), *flags)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sdserve: error: "), stderr
    assert named in lines[0] and says in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "o.state").exists()

"""`compile onnx`: tiny-sd1 and a ControlNet exported, each graph checked by the command, and the
graphs checked again here against the diffusers modules at a batch and size not exported with;
the manifest describes the directory and its refit map names the modules' weights; ControlNet
units served from the export give the eager engine's images."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from sdserve.compile.manifest import MANIFEST_FILE, read_manifest
from sdserve.compile.onnx_export import OnnxConfig, export_onnx
from tests.compile.conftest import MODEL, base_dir, run_cli, tree_digest


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    unet = UNet2DConditionModel.from_pretrained(base_dir(), subfolder="unet")
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # from_unet zero-initialises the output convs: give them values
        for parameter in net.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("controlnet") / "canny"
    net.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, controlnet_dir):
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    before = tree_digest(base_dir())
    from sdserve.cli.main import main

    assert main(["compile", "onnx", "--model", MODEL, "--controlnet", f"canny={controlnet_dir}",
                 "--out", str(out), "--no-progress"]) == 0
    assert tree_digest(base_dir()) == before
    return out


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_manifest_describes_every_component(exported):
    manifest = read_manifest(exported)
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "controlnet/canny",
                                        "unet_controlled"}
    assert manifest.family == "sd1" and manifest.opset == 17 and not manifest.fp16
    for component in manifest.components.values():
        assert component.check.passed and component.check.max_rel < 1e-4, component.name
    unet = manifest.components["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.inputs[0].shape == ("batch", 4, "height", "width")
    meta = json.loads((exported / "sdserve.json").read_text())
    assert meta["family"] == "sd1" and meta["defaults"]["width"] == 32
    for name in ("scheduler/scheduler_config.json", "tokenizer/tokenizer.json"):
        assert (exported / name).is_file()


def test_unet_graph_matches_diffusers_at_another_batch_and_size(exported):
    unet = UNet2DConditionModel.from_pretrained(base_dir(), subfolder="unet").eval()
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(3, 4, 12, 20, generator=generator)  # neither the export's batch nor its size
    timestep = torch.tensor([1.0, 500.0, 999.0])
    states = torch.randn(3, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        want = unet(sample, timestep, states).sample.numpy()
    feed = {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": states.numpy()}
    got = _session(exported / "unet/model.onnx").run(["noise_pred"], feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_vae_and_controlnet_graphs_match_diffusers(exported, controlnet_dir):
    vae = AutoencoderKL.from_pretrained(base_dir(), subfolder="vae").eval()
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 4, 10, 6, generator=generator)
    with torch.no_grad():
        want = vae.decode(latents).sample.numpy()
    got = _session(exported / "vae_decoder/model.onnx").run(["sample"], {"latent_sample": latents.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

    net = ControlNetModel.from_pretrained(controlnet_dir).eval()
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    states = torch.randn(1, 77, net.config.cross_attention_dim, generator=generator)
    cond = torch.rand(1, 3, 16, 16, generator=generator)
    with torch.no_grad():
        down, mid = net(sample, torch.tensor([250.0]), states, cond, return_dict=False)
    session = _session(exported / "controlnet/canny/model.onnx")
    outputs = session.run(None, {"sample": sample.numpy(), "timestep": np.array([250.0], np.float32),
                                 "encoder_hidden_states": states.numpy(), "controlnet_cond": cond.numpy()})
    assert len(outputs) == len(down) + 1
    for got, want in zip(outputs, [*down, mid]):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_refit_map_names_each_targeted_weight(exported):
    manifest = read_manifest(exported)
    refit = manifest.components["unet"].refit
    unet = UNet2DConditionModel.from_pretrained(base_dir(), subfolder="unet")
    targets = [f"unet.{path}" for path, module in unet.named_modules()
               if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and path]
    assert sorted(refit) == sorted(targets)
    graph = onnx.load(str(exported / "unet/model.onnx")).graph  # with its external data, beside it
    initializers = {init.name: init for init in graph.initializer}
    for target in ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "unet.conv_in"):
        value = onnx.numpy_helper.to_array(initializers[refit[target]])
        weight = unet.get_submodule(target.removeprefix("unet.")).weight.detach().numpy()
        np.testing.assert_array_equal(value, weight)
    assert len(manifest.components["text_encoder"].refit) > 0


def test_a_check_past_the_tolerance_fails_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    result = export_onnx(OnnxConfig(model=MODEL, out=out, progress=False, tolerance=0.0))
    assert result.failed  # float32 onnxruntime and torch differ in the last bits somewhere
    assert not out.exists() and not list(tmp_path.iterdir())


def test_fp16_export_is_checked_against_the_float32_model(tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "compile", "onnx", "--model", MODEL, "--fp16", "--out",
                                   str(tmp_path / "half"))
    assert code == 0, stderr
    assert "onnx: 100%" in stderr and "unet" in stderr  # the progress bar, naming the graph at work
    manifest = read_manifest(tmp_path / "half")
    assert manifest.fp16 and manifest.components["unet"].dtype == "float16"
    assert 1e-5 < manifest.components["unet"].check.max_rel <= 3e-2  # float16 rounding, bounded
    assert "unet" in stdout and "max rel" in stdout
    assert MANIFEST_FILE in {p.name for p in (tmp_path / "half").iterdir()}


def test_text_encoder_with_an_attention_mask_takes_it_as_an_input(tmp_path):
    """An encoder whose config asks for a mask (the SD family passes one then) exports with it."""
    from sdserve.compile.onnx_export import _export_one, check_graph, open_graph
    from sdserve.compile.onnx_graphs import text_encoder_spec
    from tests.adapters.lora_factory import tiny_clip

    encoder = tiny_clip()
    encoder.config.use_attention_mask = True
    spec = text_encoder_spec("text_encoder", encoder, 77)
    example = spec.make_inputs(2, 0, 0, torch.Generator().manual_seed(0))
    assert spec.inputs == ("input_ids", "attention_mask") and not bool(example["attention_mask"].all())
    _export_one(spec, tmp_path / "te", 17, example)
    session = open_graph(tmp_path / "te" / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert check_graph(spec, session, [(3, 0, 0)], 1e-4).passed
    ids = example["input_ids"][:1]
    unmasked = session.run(["last_hidden_state"], {"input_ids": ids.numpy(),
                                                   "attention_mask": np.ones_like(ids.numpy())})[0]
    masked = session.run(["last_hidden_state"], {"input_ids": ids.numpy(),
                                                 "attention_mask": example["attention_mask"][:1].numpy()})[0]
    assert np.abs(unmasked - masked).max() > 1e-4  # the mask is used, not folded away


STEPS = 10  # the backend's 20-step equality is tests/compile/test_onnx_backend.py's; this one costs half


def _control_png(seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_controlnet_units_on_the_export_give_the_eager_images(exported, controlnet_dir, tmp_path):
    """A unit naming the exported ControlNet (by its directory, as the eager engine is given it, or
    by the export's name for it) runs its graph and the UNet that takes residuals: each image is
    the eager engine's within 2/255 at 10 steps, in a batch mixed with rows without a unit; a
    ControlNet the export does not hold is refused naming the unit's model."""
    from sdserve.api.types import ControlSpec, RequestSpec
    from sdserve.engine import Engine, EngineConfig
    from sdserve.errors import InvalidArgument

    engine = Engine(EngineConfig(device="cpu", dtype="float32"))

    def images(specs):
        results = engine.generate([engine.validate(spec) for spec in specs])
        for result in results:
            assert not isinstance(result, Exception), result
        return [np.stack(result.images).astype(int) for result in results]

    def requests(model, control_name):
        # Two units of the one exported ControlNet (their residuals sum), one of them for part of
        # the steps; and a request without a unit in the same batch (its rows read zeros).
        units = (ControlSpec(model=control_name, image=_control_png(1), scale=4.0, end=0.7),
                 ControlSpec(model=control_name, image=_control_png(2), scale=-2.0))
        return [RequestSpec(model=model, prompt="a red circle", seed=31, steps=STEPS, controlnets=units),
                RequestSpec(model=model, prompt="a red circle", seed=31, steps=STEPS)]

    eager = images(requests(MODEL, str(controlnet_dir)))
    compiled = images(requests(str(exported), str(controlnet_dir)))
    for ours, theirs in zip(compiled, eager, strict=True):
        assert np.abs(ours - theirs).max() <= 2
    effect = np.abs(compiled[0][0] - compiled[1][0]).max()
    assert effect > 3 * 2, effect  # the units change the image well past the tolerance
    by_name = engine.validate(requests(str(exported), "canny")[0])  # the export's own name for it
    assert [unit.source.name for unit in by_name.controlnets] == ["controlnet/canny"] * 2

    other = tmp_path / "other"
    net = ControlNetModel.from_pretrained(controlnet_dir)
    with torch.no_grad():
        net.controlnet_mid_block.weight.add_(0.1)
    net.save_pretrained(other)
    for name in (str(other), "nothing-exported"):
        with pytest.raises(InvalidArgument) as error:
            engine.validate(RequestSpec(model=str(exported), prompt="x",
                                        controlnets=(ControlSpec(model=name, image=_control_png(1)),)))
        assert error.value.field == "controlnets[0].model" and "canny" in error.value.message

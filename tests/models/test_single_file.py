"""Models as users' folders hold them: single-file checkpoints, fp16 variant dirs, a separate VAE.

Oracles: the built-in model's own diffusers directory (a checkpoint written out in the original
layout must serve the same pixels), and stock diffusers pipelines (fp16 variant, swapped VAE).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdserve.engine import Engine, EngineConfig, ModelStore, RequestSpec
from sdserve.errors import InvalidArgument
from sdserve.models import single_file
from sdserve.models.builtin import builtin_path
from sdserve.models.variants import weights_variant
from tests.models.ldm_layout import vae_to_ldm, write_original_checkpoint, write_sparse_checkpoint

TOLERANCE = 2  # of 255


def _images(store: ModelStore, model: str, seed: int = 7) -> np.ndarray:
    key = (model, store.vaes.get(model), seed)
    if key not in _IMAGES:
        _IMAGES[key] = _generate(store, model, seed)
    return _IMAGES[key]


_IMAGES: dict[tuple, np.ndarray] = {}  # the engine's images per (model, VAE, seed): tests share them


def _generate(store: ModelStore, model: str, seed: int) -> np.ndarray:
    engine = Engine(EngineConfig(), models=store)
    spec = RequestSpec(model=model, prompt="a red circle on the left", seed=seed, steps=3, width=32, height=32)
    [outcome] = engine.generate([engine.validate(spec)])
    return np.stack([np.asarray(image) for image in outcome.images])  # [n, H, W, 3] uint8


def _diffusers_images(pipe, seed: int = 7) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    images = pipe(
        prompt="a red circle on the left", num_inference_steps=3, width=32, height=32, guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    ).images
    return (images * 255).round().astype(np.uint8)


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("single-file")
    files = {}
    for name in ("tiny-sd1", "tiny-sdxl"):
        files[name] = out / f"{name}.safetensors"
        write_original_checkpoint(builtin_path(name), files[name])
    return files


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_a_checkpoint_in_the_original_layout_serves_the_same_images(checkpoints, model):
    store = ModelStore(EngineConfig())
    info = store.info(str(checkpoints[model]))
    source = json.loads((info.path / single_file.SOURCE_FILE).read_text())
    # Its shapes pick the tiny model's configs, not the default model's (also SD 1.x).
    assert source["architecture"] == builtin_path(model).name and source["family"] == info.family
    assert info.path.parent == single_file.single_file_cache() and info.path.name == source["sha256"]
    assert _diff(_images(store, str(checkpoints[model])), _images(store, model)) <= TOLERANCE


@pytest.mark.parametrize("model", ["tiny-sd2", "tiny-sd1-inpaint"])
def test_sd2_and_inpainting_checkpoints_convert_to_the_same_weights(tmp_path, model):
    # SD 2.x's OpenCLIP text encoder is stored with fused q/k/v and other names; an inpainting
    # UNet takes 9 channels and another pipeline class: check every tensor.
    path = tmp_path / f"{model}.safetensors"
    write_original_checkpoint(builtin_path(model), path)
    info = ModelStore(EngineConfig()).info(str(path))
    converted = info.path
    assert info.unet_in_channels == (9 if "inpaint" in model else 4)
    for component in ("unet", "vae", "text_encoder"):
        [mine] = (converted / component).glob("*.safetensors")
        [theirs] = (builtin_path(model) / component).glob("*.safetensors")
        a, b = load_file(mine), load_file(theirs)
        assert a.keys() == b.keys(), component
        assert all(torch.equal(a[k], b[k]) for k in a), component


def test_a_second_load_hits_the_cache_and_a_renamed_copy_too(checkpoints, tmp_path, monkeypatch):
    first = ModelStore(EngineConfig()).info(str(checkpoints["tiny-sd1"])).path
    real_sha256 = single_file.file_sha256

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(single_file, "convert", no_conversion)
    hashed = []
    monkeypatch.setattr(single_file, "file_sha256", lambda path: hashed.append(path) or real_sha256(path))
    assert ModelStore(EngineConfig()).info(str(checkpoints["tiny-sd1"])).path == first
    assert hashed == []  # the digest of an unchanged file is remembered
    copy = tmp_path / "renamed.safetensors"
    shutil.copyfile(checkpoints["tiny-sd1"], copy)
    assert ModelStore(EngineConfig()).info(str(copy)).path == first and hashed == [copy.resolve()]
    # An edited file is another model: the cache is keyed by content, not by name.
    state = load_file(checkpoints["tiny-sd1"])
    state["model.diffusion_model.out.2.bias"] += 1
    save_file(state, str(copy))
    with pytest.raises(AssertionError, match="converted again"):
        ModelStore(EngineConfig()).info(str(copy))
    assert hashed == [copy.resolve()] * 2


class _Payload:
    """Unpickling this would create a file: the refusal must happen before any unpickling."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "disguised.safetensors"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    torch.save({"state_dict": _Payload(marker)}, path)  # a zip of pickles, as .ckpt files are
    with pytest.raises(InvalidArgument, match=r"pickle checkpoint.*convert it to \.safetensors") as caught:
        ModelStore(EngineConfig()).info(str(path))
    assert str(tmp_path) not in str(caught.value) and not marker.exists()
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(InvalidArgument, match="pickle"):
        ModelStore(EngineConfig()).info(str(raw))
    assert not marker.exists()


@pytest.mark.parametrize(
    "keys,looks_like",
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}, "LoRA"),
        ({"emb_params": (2, 32)}, "textual-inversion embedding"),
        ({"encoder.down.0.block.0.conv1.weight": (4, 4, 3, 3), "decoder.up.0.block.0.conv1.weight": (4, 4, 3, 3)}, "--vae"),
        ({"first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3)}, "a VAE alone"),
        ({"down_blocks.0.resnets.0.conv1.weight": (4, 4, 3, 3)}, "component of a diffusers-format model"),
        ({"weight": (3,)}, "not a Stable Diffusion checkpoint"),
    ],
)
def test_files_that_are_not_checkpoints_are_refused_naming_what_they_look_like(tmp_path, keys, looks_like):
    path = tmp_path / "thing.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, str(path))
    with pytest.raises(InvalidArgument, match=looks_like):
        ModelStore(EngineConfig()).info(str(path))


def test_a_checkpoint_no_shipped_architecture_fits_is_refused_with_the_misfit(checkpoints, tmp_path):
    state = load_file(checkpoints["tiny-sd1"])
    # A narrower VAE decoder than tiny-sd1's: the UNet's first convolution still fits, the rest not.
    state["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(InvalidArgument, match=r"fit no architecture.*sd15 \(unet: conv_in.weight is \[32, 4\].*"
                       r"tiny-sd1-v3 \(vae: decoder.conv_out.weight is \[3, 16, 3, 3\], the config needs \[3, 32, 3, 3\]"):
        ModelStore(EngineConfig()).info(str(path))


def test_an_fp16_variant_dir_loads_and_matches_diffusers(tmp_path):
    source = builtin_path("tiny-sd1")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(source).to(torch.float16)
    out = tmp_path / "fp16-only"
    pipe.save_pretrained(out, variant="fp16")
    shutil.copyfile(source / "sdserve.json", out / "sdserve.json")
    assert not list(out.glob("*/diffusion_pytorch_model.safetensors")), "only variant files, as downloads hold"
    assert weights_variant(out / "unet") == "fp16" and weights_variant(source / "unet") is None
    oracle = diffusers.StableDiffusionPipeline.from_pretrained(out, variant="fp16", torch_dtype=torch.float32)
    assert _diff(_images(ModelStore(EngineConfig()), str(out)), _diffusers_images(oracle)) <= TOLERANCE


@pytest.fixture(scope="module")
def perturbed_vae(tmp_path_factory) -> dict[str, Path]:
    """tiny-sd1's VAE with its decoder's last convolution changed, as a dir and as original-layout file."""
    out = tmp_path_factory.mktemp("vae")
    vae = diffusers.AutoencoderKL.from_pretrained(builtin_path("tiny-sd1"), subfolder="vae")
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        weight = vae.decoder.conv_out.weight  # [3, 32, 3, 3]
        weight += 0.5 * weight.std() * torch.randn(weight.shape, generator=generator)
    vae.save_pretrained(out / "dir")
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config), prefix="").items()},
              str(out / "vae-ldm.safetensors"))
    return {"dir": out / "dir", "file": out / "vae-ldm.safetensors"}


def test_a_separate_vae_is_used_and_matches_diffusers_with_that_vae(perturbed_vae):
    plain = _images(ModelStore(EngineConfig()), "tiny-sd1")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        builtin_path("tiny-sd1"), vae=diffusers.AutoencoderKL.from_pretrained(perturbed_vae["dir"])
    )
    expected = _diffusers_images(pipe)
    for form in ("dir", "file"):
        swapped = _images(ModelStore(EngineConfig(), vaes={"tiny-sd1": str(perturbed_vae[form])}), "tiny-sd1")
        assert _diff(swapped, plain) > 10, form  # the swap changes the image ...
        assert _diff(swapped, expected) <= TOLERANCE, form  # ... into diffusers' with that VAE


def test_a_vae_that_does_not_fit_the_model_is_refused(tmp_path):
    vae = diffusers.AutoencoderKL.from_pretrained(builtin_path("tiny-sd1"), subfolder="vae")
    state = vae_to_ldm(vae.state_dict(), dict(vae.config), prefix="")
    state["decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    path = tmp_path / "narrow-vae.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    engine = Engine(EngineConfig(), models=ModelStore(EngineConfig(), vaes={"tiny-sd1": str(path)}))
    with pytest.raises(InvalidArgument, match="narrow-vae.safetensors.*does not fit"):
        engine.load_model("tiny-sd1")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(InvalidArgument, match="VAE 'lora.safetensors': looks like a LoRA"):
        ModelStore(EngineConfig(), vaes={"tiny-sd1": str(lora)}).info("tiny-sd1")
    pickled = tmp_path / "vae.pt"
    torch.save({}, pickled)
    with pytest.raises(InvalidArgument, match="VAE 'vae.pt': is a pickle checkpoint"):
        ModelStore(EngineConfig(), vaes={"tiny-sd1": str(pickled)}).info("tiny-sd1")


@pytest.mark.parametrize(
    "architecture,family",
    [
        ("sd15", "sd1"),
        # Building SD 2.x's and SDXL's modules on the meta device takes 4-10 s on this machine.
        pytest.param("sd15-inpaint", "sd1", marks=pytest.mark.slow),
        pytest.param("sd21", "sd2", marks=pytest.mark.slow),
        pytest.param("sdxl", "sdxl", marks=pytest.mark.slow),
    ],
)
def test_full_size_checkpoints_pick_the_architecture_sdserve_ships(tmp_path, architecture, family):
    # Sparse files with the header of a full-size fp16 checkpoint (SD 1.5: 2.0 GiB, SDXL: 6.5 GiB
    # apparent, ~300 KiB on disk): the match reads only the header.
    path = tmp_path / f"{architecture}.safetensors"
    write_sparse_checkpoint(single_file.ARCHITECTURES_DIR / architecture, path)
    header = single_file.read_header(path)
    assert single_file.detect_family(path, header) == family
    assert single_file.match_architecture(path, family, header) == single_file.ARCHITECTURES_DIR / architecture


def test_the_shipped_clip_tokenizer_is_clips(tmp_path):
    from sdserve.models.tokenizer import write_openai_clip_tokenizer

    tokenizer = write_openai_clip_tokenizer(tmp_path, single_file.ARCHITECTURES_DIR / "clip_merges.txt.gz")
    # Ids from OpenAI's CLIP tokenizer (openai/clip-vit-large-patch14), as diffusers' docs print them.
    assert len(tokenizer) == 49408
    assert tokenizer("a photograph of an astronaut riding a horse").input_ids == [
        49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407
    ]


def test_cli_generate_takes_a_checkpoint_file_and_a_vae(checkpoints, perturbed_vae, tmp_path, capsys):
    from tests.cli.test_cli import sdserve_in_process

    out = tmp_path / "out.png"
    code, _, err = sdserve_in_process(
        capsys, "generate", "--model", str(checkpoints["tiny-sd1"]), "--vae", str(perturbed_vae["file"]),
        "--prompt", "a red circle on the left", "--seed", "7", "--steps", "3", "--width", "32", "--height", "32",
        "--out", str(out), "--quiet",
    )
    assert code == 0, err
    expected = _images(ModelStore(EngineConfig(), vaes={"tiny-sd1": str(perturbed_vae["dir"])}), "tiny-sd1")
    from PIL import Image

    assert _diff(np.asarray(Image.open(out).convert("RGB"))[None], expected) <= TOLERANCE
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04")
    code, _, err = sdserve_in_process(capsys, "generate", "--model", str(ckpt), "--prompt", "x", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "convert it to .safetensors" in err


def test_server_config_takes_a_vae_per_served_model():
    from sdserve.server.config import config_from_dict

    config = config_from_dict({"models": {"serve": ["tiny-sd1", "/m/x.safetensors"], "vae": {"tiny-sd1": "/m/vae"}}})
    assert config.models.vae == {"tiny-sd1": "/m/vae"}
    with pytest.raises(InvalidArgument, match=r"\[models.vae\] 'tiny-sd2' is not one of serve"):
        config_from_dict({"models": {"serve": ["tiny-sd1"], "vae": {"tiny-sd2": "/m/vae"}}})


def test_the_server_hands_its_vae_table_to_the_model_store():
    from sdserve.server.app import Server
    from sdserve.server.config import config_from_dict

    config = config_from_dict({"models": {"serve": ["tiny-sd1"], "vae": {"tiny-sd1": "/m/vae.safetensors"}}})
    assert Server(config).engine.models.vaes == {"tiny-sd1": "/m/vae.safetensors"}


def test_a_separate_vae_is_refused_for_an_onnx_export(tmp_path):
    from sdserve.engine.onnx_backend import MANIFEST_FILE

    export = tmp_path / "export"
    export.mkdir()
    (export / MANIFEST_FILE).write_text("{}")  # refused before the manifest is read
    with pytest.raises(InvalidArgument, match="does not apply to an ONNX export"):
        ModelStore(EngineConfig(), vaes={str(export): "/m/vae.safetensors"}).info(str(export))


def test_cli_models_convert_prints_the_cached_directory(checkpoints, capsys, tmp_path):
    from tests.cli.test_cli import sdserve_in_process

    code, out, err = sdserve_in_process(capsys, "models", "convert", str(checkpoints["tiny-sd1"]))
    assert code in (0, None), err
    assert Path(out.strip()) == ModelStore(EngineConfig()).info(str(checkpoints["tiny-sd1"])).path
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    code, out, err = sdserve_in_process(capsys, "models", "convert", str(lora))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "looks like a LoRA" in err


def test_a_whole_checkpoint_can_give_its_vae(checkpoints, perturbed_vae, tmp_path):
    # A whole checkpoint whose first_stage_model.* is the perturbed VAE: only those are read.
    state = load_file(checkpoints["tiny-sd1"])
    state.update({f"first_stage_model.{k}": v for k, v in load_file(perturbed_vae["file"]).items()})
    whole = tmp_path / "whole.safetensors"
    save_file(state, str(whole))
    swapped = _images(ModelStore(EngineConfig(), vaes={"tiny-sd1": str(whole)}), "tiny-sd1")
    by_dir = _images(ModelStore(EngineConfig(), vaes={"tiny-sd1": str(perturbed_vae["dir"])}), "tiny-sd1")
    assert _diff(swapped, by_dir) == 0 and _diff(swapped, _images(ModelStore(EngineConfig()), "tiny-sd1")) > 10


def test_cli_serve_vae_flag_sets_the_default_models_vae(monkeypatch, capsys):
    import sdserve.server.app as app
    from tests.cli.test_cli import sdserve_in_process

    seen = []

    async def fake_serve(config):
        seen.append(config)
        return 0

    monkeypatch.setattr(app, "serve", fake_serve)
    code, _, err = sdserve_in_process(capsys, "serve", "--model", "tiny-sd1", "--model", "tiny-sd2", "--vae", "/m/v")
    assert code in (0, None), err
    assert seen[0].models.vae == {"tiny-sd1": "/m/v"}

"""What the trainers write gives the same image in diffusers as in sdserve (<= 2/255): the LoRA in
both layouts (`load_lora_weights`), the DreamBooth directory (`from_pretrained`) and the textual
inversion embedding (`load_textual_inversion`), each trained by the CLI for two steps on tiny-sd1
at a learning rate large enough that the image moves away from the base model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdserve.cli.main import main
from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.request import AdapterSpec, EmbeddingSpec
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler
from sdserve.models.builtin import builtin_path
from tests.engine.oracle import max_pixel_difference
from tests.trainers.conftest import write_folder

MODEL = "tiny-sd1"
TOLERANCE = 2
TRAIN = ["--steps", "2", "--lr", "0.05", "--no-progress", "--model", MODEL]
REQUEST = dict(seed=11, steps=4, guidance_scale=6.0, negative_prompt="blurry", scheduler="euler",
               width=32, height=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("interop")
    data = write_folder(work / "data", count=2, caption="a photo of sks dog")
    token_data = write_folder(work / "token-data", count=2, caption="a photo of <toy> dog")
    outputs = {
        "lora": work / "lora.safetensors",
        "kohya": work / "kohya.safetensors",
        "dreambooth": work / "dreambooth",
        "embedding": work / "toy.safetensors",
    }
    commands = [
        ["lora", "--data", str(data), "--out", str(outputs["lora"]), "--text-encoder"],
        ["lora", "--data", str(data), "--out", str(outputs["kohya"]), "--text-encoder", "--format", "kohya",
         "--targets", "attn,conv", "--seed", "1"],  # LoCon: the ResNet convs too,
        ["dreambooth", "--data", str(data), "--instance-prompt", "a photo of sks dog",
         "--class-prompt", "a photo of dog", "--num-class-images", "2", "--out", str(outputs["dreambooth"])],
        ["textual-inversion", "--data", str(token_data), "--token", "<toy>", "--init-token", "dog",
         "--num-vectors", "2", "--out", str(outputs["embedding"])],
    ]
    for command in commands:
        assert main(["train", *command, *TRAIN]) == 0, command
    return outputs


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(device="cpu", dtype="float32"))


def _sdserve(engine: Engine, **fields) -> np.ndarray:
    """uint8 [H, W, 3] of one request through the engine."""
    return engine.generate([engine.validate(RequestSpec(**(REQUEST | fields)))])[0].images[0]


def _diffusers(pipe: StableDiffusionPipeline, prompt: str) -> np.ndarray:
    """uint8 [H, W, 3]: the stock pipeline with the engine's scheduler, seed and sizes."""
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(resolve_scheduler(REQUEST["scheduler"]), dict(pipe.scheduler.config))
    image = pipe(prompt, negative_prompt=REQUEST["negative_prompt"], num_inference_steps=REQUEST["steps"],
                 guidance_scale=REQUEST["guidance_scale"], width=REQUEST["width"], height=REQUEST["height"], output_type="np",
                 generator=torch.Generator("cpu").manual_seed(REQUEST["seed"])).images[0]
    return (image * 255).round().astype(np.uint8)


def _moved(engine: Engine, image: np.ndarray, prompt: str) -> bool:
    """The trained output must change the image, or equality with diffusers proves nothing."""
    return max_pixel_difference(image, _sdserve(engine, model=MODEL, prompt=prompt)) > 10


@pytest.mark.parametrize("layout", ["lora", "kohya"])
def test_lora_gives_the_same_image_in_diffusers(engine, trained, layout):
    prompt = "a photo of sks dog"
    ours = _sdserve(engine, model=MODEL, prompt=prompt, adapters=(AdapterSpec(path=str(trained[layout])),))
    pipe = StableDiffusionPipeline.from_pretrained(builtin_path(MODEL))
    pipe.load_lora_weights(str(trained[layout]))
    assert max_pixel_difference(ours, _diffusers(pipe, prompt)) <= TOLERANCE
    assert _moved(engine, ours, prompt)


def test_dreambooth_dir_gives_the_same_image_in_diffusers(engine, trained):
    prompt = "a photo of sks dog"
    ours = _sdserve(engine, model=str(trained["dreambooth"]), prompt=prompt)
    pipe = StableDiffusionPipeline.from_pretrained(trained["dreambooth"])
    assert max_pixel_difference(ours, _diffusers(pipe, prompt)) <= TOLERANCE
    assert _moved(engine, ours, prompt)


def test_embedding_gives_the_same_image_in_diffusers(engine, trained):
    prompt = "a photo of <toy> dog"
    ours = _sdserve(engine, model=MODEL, prompt=prompt,
                    embeddings=(EmbeddingSpec(path=str(trained["embedding"]), token="<toy>"),))
    pipe = StableDiffusionPipeline.from_pretrained(builtin_path(MODEL))
    pipe.load_textual_inversion(str(trained["embedding"]), token="<toy>")
    assert max_pixel_difference(ours, _diffusers(pipe, prompt)) <= TOLERANCE
    # The base model reads "<toy>" as its letters; the embedding must draw something else.
    assert _moved(engine, ours, prompt)

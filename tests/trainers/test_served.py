"""What the trainers write serves: each output uploads to a running server and, in calls sent
together by two tenants (so the engine batches them), gives the image the in-process engine gives
for the same file alone, and an image other than the base model's."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from sdserve.cli.main import main
from tests.server.conftest import (  # noqa: F401  (the fixtures `server`, `reference_engine` are used by name)
    MODEL,
    max_diff,
    png_pixels,
    reference_engine,
    reference_images,
    server,
    sha,
)
from tests.trainers.conftest import write_folder

STEPS = ["--steps", "2", "--lr", "0.05", "--no-progress", "--model", MODEL]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One output of each adapter trainer on tiny-sd1, two steps each at a large learning rate."""
    work = tmp_path_factory.mktemp("trained")
    data = write_folder(work / "data", count=2, caption="a photo of sks dog")
    token_data = write_folder(work / "token-data", count=2, caption="a photo of <toy> dog")
    outputs = {
        "lora": work / "lora.safetensors",
        "kohya": work / "kohya.safetensors",
        "embedding": work / "toy.safetensors",
        "hypernetwork": work / "hn.safetensors",
        "dreambooth": work / "db-lora.safetensors",
    }
    commands = [
        ["lora", "--data", str(data), "--out", str(outputs["lora"]), "--text-encoder"],
        ["lora", "--data", str(data), "--out", str(outputs["kohya"]), "--format", "kohya", "--seed", "1"],
        ["textual-inversion", "--data", str(token_data), "--token", "<toy>", "--init-token", "dog",
         "--num-vectors", "2", "--out", str(outputs["embedding"])],
        ["hypernetwork", "--data", str(data), "--out", str(outputs["hypernetwork"])],
        ["dreambooth", "--data", str(data), "--instance-prompt", "a photo of sks dog", "--lora",
         "--out", str(outputs["dreambooth"])],
    ]
    for command in commands:
        assert main(["train", *command, *STEPS]) == 0, command
    return outputs


def _scrape(thread) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{thread.server.metrics_port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}


def test_trained_outputs_upload_and_serve_in_one_mixed_batch(server, reference_engine, trained):  # noqa: F811
    alice, bob = server.client("alice"), server.client("bob")
    kinds = {"lora": "lora", "kohya": "lora", "embedding": "embedding", "hypernetwork": "hypernetwork",
             "dreambooth": "lora"}
    for key, path in trained.items():
        client = alice if key in ("lora", "embedding", "dreambooth") else bob
        info = client.upload_adapter(path.read_bytes(), name=f"trained-{key}", family="sd1", kind=kinds[key])
        assert info.sha256 == sha(path.read_bytes())

    prompt = {"model": MODEL, "seed": 7, "steps": 3}
    calls = [  # (client, request by name, the same request by path for the in-process engine)
        (alice, {"prompt": "a photo of sks dog", "adapters": [{"name": "trained-lora", "scale": 1.0}]},
         {"adapters": [{"path": str(trained["lora"]), "scale": 1.0}]}),
        (bob, {"prompt": "a photo of sks dog", "adapters": [{"name": "trained-kohya", "scale": 0.8}]},
         {"adapters": [{"path": str(trained["kohya"]), "scale": 0.8}]}),
        (alice, {"prompt": "a photo of <toy> dog", "embeddings": [{"name": "trained-embedding"}]},
         {"embeddings": [{"path": str(trained["embedding"]), "token": "<toy>"}]}),
        (bob, {"prompt": "a photo of sks dog", "hypernetworks": [{"name": "trained-hypernetwork", "strength": 1.0}]},
         {"hypernetworks": [{"path": str(trained["hypernetwork"]), "strength": 1.0}]}),
        (alice, {"prompt": "a photo of sks dog", "adapters": [{"name": "trained-dreambooth"}]},
         {"adapters": [{"path": str(trained["dreambooth"])}]}),
        (bob, {"prompt": "a photo of sks dog"}, {}),
    ]
    futures = [client.generate_future({**prompt, **request}, timeout=120) for client, request, _ in calls]
    responses = [future.result() for future in futures]
    # Some UNet call held more than one request's two (CFG) rows: the stacks shared a batch.
    rows = _scrape(server)
    assert rows['sdserve_unet_batch_rows_bucket{le="2.0"}'] < rows["sdserve_unet_batch_rows_count"]
    plain = png_pixels(responses[-1].images[0].png)
    for response, (_, request, local) in zip(responses, calls, strict=True):
        by_path = {**prompt, **{k: v for k, v in request.items() if k not in local}, **local}
        want = reference_images(reference_engine, by_path)[0]
        got = png_pixels(response.images[0].png)
        assert max_diff(got, want) <= 2, request
        if local:  # the trained adapter changed the image
            assert max_diff(got, plain) > 2, request

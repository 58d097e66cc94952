"""Uploads are validated against the model they will serve (issue 23 item 4).

One server serves two SD 1.x models of different widths: tiny-sd1 (attention at 64 channels) and a
wide one (128). A LoRA made for the wide model fits only it: uploaded for the family it is accepted
(the wide model is not the family's first), recorded as fitting the wide model, serves there as the
engine serves the file, and a request naming it with tiny-sd1 is refused with the reason before
any work. A LoRA of a third width fits neither and is refused at upload with both reasons.
"""

from __future__ import annotations

import json
from dataclasses import replace

import grpc
import pytest

from sdserve.api import convert
from sdserve.cli.main import main
from sdserve.models.configs import TINY_SD1
from sdserve.server.registry import Quota, Registry
from tests.server.conftest import KEYS, ServerThread, make_config, max_diff, png_pixels, reference_images, sha

NARROW = "tiny-sd1"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _unet_config(widths: list[int]) -> dict:
    return {**TINY_SD1.unet, "block_out_channels": widths}


def _lora_file(widths: list[int], seed: int) -> bytes:
    """A PEFT LoRA (to_q, to_v) for a tiny SD 1.x UNet with these block widths, as file bytes."""
    import safetensors.torch
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from tests.adapters.lora_factory import make_peft_lora, peft_file_contents

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_unet_config(widths))
    lora = make_peft_lora({"unet": unet}, {"unet": LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"])},
                          seed)
    tensors, metadata = peft_file_contents(lora)
    return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> str:
    from sdserve.models.builtin import build_model

    path = tmp_path_factory.mktemp("models") / "wide-sd1"
    # GroupNorm's 32 groups need widths divisible by 32; the cross-attention block is at 128.
    build_model(replace(TINY_SD1, name="wide-sd1", unet=_unet_config([64, 128])), path, seed=5)
    return str(path)


@pytest.fixture(scope="module")
def two_widths(tmp_path_factory, wide_model):
    config = make_config(tmp_path_factory.mktemp("registry"), models=(NARROW, wide_model))
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def loras() -> dict[str, bytes]:
    return {"wide": _lora_file([64, 128], 1), "neither": _lora_file([32, 96], 2)}


def _refused(call, *needles: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    details = info.value.details()
    print(details)
    assert info.value.code() == INVALID, details
    for needle in needles:
        assert needle in details, details
    return details


def test_upload_for_the_family_fits_the_second_model_and_serves_only_there(
    two_widths, wide_model, loras, lora_bytes, reference_engine, tmp_path
):
    alice = two_widths.client("alice")
    info = alice.upload_adapter(loras["wide"], name="wide-style", family="sd1")
    assert (info.family, list(info.models)) == ("sd1", [wide_model])
    # A tiny-sd1 LoRA is recorded as fitting tiny-sd1 only; listing shows both verdicts.
    alice.upload_adapter(lora_bytes["sd1_a"], name="narrow-style", family="sd1")
    listed = {a.name: list(a.models) for a in alice.list_adapters().adapters}
    assert listed == {"narrow-style": [NARROW], "wide-style": [wide_model]}

    request = {"model": wide_model, "prompt": "a red circle", "seed": 3, "steps": 2}
    adapted = {**request, "adapters": [{"name": "wide-style", "scale": 1.0}]}
    served = png_pixels(alice.generate(adapted).images[0].png)
    plain = png_pixels(alice.generate(request).images[0].png)
    path = tmp_path / "wide.safetensors"
    path.write_bytes(loras["wide"])
    want = reference_images(reference_engine, {**request, "adapters": [{"path": str(path), "scale": 1.0}]})[0]
    assert max_diff(served, want) <= 2
    assert max_diff(served, plain) > 2, "the LoRA did not change the wide model's image"

    # With the first model: refused with the reason found at upload, naming the adapters field.
    details = _refused(lambda: alice.generate({**adapted, "model": NARROW}),
                       "adapters[0].name:", "does not fit model 'tiny-sd1'", "shape", repr(wide_model))
    assert "[2, 128]" in details  # the file's down weight, as the upload check read it
    # The same for a <lora:> tag in the prompt (A1111 syntax), naming the prompt.
    _refused(lambda: alice.generate({"model": NARROW, "prompt": "a cat <lora:wide-style:1>", "steps": 2,
                                     "prompt_syntax": "a1111"}), "prompt:", "does not fit model 'tiny-sd1'")


def test_upload_for_a_model_and_for_no_family(two_widths, wide_model, loras):
    bob = two_widths.client("bob")
    registry = two_widths.core.registry
    _refused(lambda: bob.upload_adapter(loras["wide"], name="w", model=NARROW),
             "data:", "does not fit model 'tiny-sd1'", "shape")
    _refused(lambda: bob.upload_adapter(loras["wide"], name="w", model="nope"), "header.model:", "no model 'nope'")
    _refused(lambda: bob.upload_adapter(loras["wide"], name="w", family="sdxl", model=NARROW),
             "header.model:", "is sd1, not sdxl")
    assert registry.list("bob") == []
    info = bob.upload_adapter(loras["wide"], name="w", model=wide_model)
    assert (info.family, list(info.models)) == ("sd1", [wide_model])
    # Checked against the named model only: no verdict on tiny-sd1 is recorded.
    assert registry.resolve("bob", "w").checked == ((wide_model, ""),)
    # Neither a family nor a model: every served model is tried, the family is the fitting one's.
    info = bob.upload_adapter(loras["wide"], name="w2")
    assert (info.family, list(info.models)) == ("sd1", [wide_model])


def test_lora_fitting_neither_model_is_refused_at_upload(two_widths, wide_model, loras):
    alice = two_widths.client("alice")
    before = two_widths.core.registry.files()
    details = _refused(lambda: alice.upload_adapter(loras["neither"], name="neither", family="sd1"),
                       "data:", "fits none of the served models", "'tiny-sd1': ", f"{wide_model!r}: ", "[2, 96]")
    assert details.count("shape") >= 2  # one reason per model
    assert two_widths.core.registry.files() == before


def test_cli_upload_with_model(two_widths, wide_model, loras, tmp_path, capsys):
    path = tmp_path / "wide.safetensors"
    path.write_bytes(loras["wide"])
    main(["client", "--target", two_widths.target, "--api-key", KEYS["admin"], "--timeout", "60",
          "adapters", "upload", str(path), "--name", "cli-wide", "--model", wide_model])
    shown = json.loads(capsys.readouterr().out)
    assert (shown["family"], shown["models"], shown["sha256"]) == ("sd1", [wide_model], sha(loras["wide"]))


def test_registry_keeps_verdicts_across_reopen(tmp_path):
    registry = Registry(tmp_path)
    staged = tmp_path / "tmp" / "x.part"
    staged.write_bytes(b"x")
    digest = sha(b"x")
    record = registry.register("t", "a", "lora", "sd1", staged, digest, Quota(5, 100),
                               checked={"m2": "", "m1": "module q: shape"})
    assert (record.fits, record.misfit("m1"), record.misfit("m2"), record.misfit("m3")) == (
        ("m2",), "module q: shape", None, None)
    registry.close()
    again = Registry(tmp_path).resolve("t", "a")
    assert again.checked == (("m1", "module q: shape"), ("m2", ""))
    assert convert.adapter_info(again).models == ["m2"]

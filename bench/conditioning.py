"""What does per-request conditioning cost? One denoising step of a batch of 8 rows on the
SD1.5-shaped UNet (random weights, 32×32 latents), with a ControlNet on 0, 4 or 8 rows and an
IP-Adapter on 0, 4 or 8 rows. A unit runs only on the rows that use it, so 4 rows should cost
about half of 8; the baseline is the same batch with no conditioning, measured in the same run.

    python -m bench.conditioning [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image
from tqdm import tqdm

from bench.common import machine, print_table, write_json
from bench.engine_batching import sd15_shaped_path
from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.batch import assemble_batch
from sdserve.engine.controlnet import ControlSpec
from sdserve.engine.ip_adapter import IPAdapterSpec
from sdserve.paths import cache_root


def png(seed: int, size: int = 256) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def controlnet_dir(model_dir: Path) -> Path:
    from diffusers import ControlNetModel, UNet2DConditionModel

    path = cache_root() / "bench" / "sd15-shaped-controlnet"
    if not (path / "config.json").exists():
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        ControlNetModel.from_unet(unet).save_pretrained(path)
    return path


def ip_adapter_dir(model_dir: Path) -> Path:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = cache_root() / "bench" / "sd15-shaped-ip-adapter"
    if (path / "ip_adapter.safetensors").exists():
        return path
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_hidden_layers=2,
        image_size=224, patch_size=32, projection_dim=1024,
    )).save_pretrained(path / "image_encoder")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    cross = unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": torch.randn(4 * cross, 1024) * 0.02,
               "image_proj.proj.bias": torch.zeros(4 * cross),
               "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.02
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.02
        key_id += 2
    safetensors.torch.save_file(tensors, str(path / "ip_adapter.safetensors"))
    return path


def step_seconds(engine: Engine, specs: list[RequestSpec], repeats: int) -> list[float]:
    """Admit the requests, then time `repeats` single UNet steps of their batch."""
    for spec in specs:
        engine.submit(engine.validate(spec))
    engine._admit()
    states = engine.batcher.active()
    model = states[0].model
    times = []
    for _ in range(repeats):
        batch = assemble_batch(states[0].group_key, states)
        started = time.perf_counter()
        engine.runner.step(model, batch)
        times.append(time.perf_counter() - started)
    for state in states:
        engine.batcher.remove(state)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model_dir = sd15_shaped_path()
    cn, ip = controlnet_dir(model_dir), ip_adapter_dir(model_dir)
    engine = Engine(EngineConfig(max_batch_rows=8))
    model = str(model_dir)

    def specs(controlled: int = 0, ip_rows: int = 0) -> list[RequestSpec]:
        out = []
        for i in range(8):
            controls = (ControlSpec(model=str(cn), image=png(i)),) if i < controlled else ()
            ips = (IPAdapterSpec(model=str(ip), image=png(100 + i), scale=0.6),) if i < ip_rows else ()
            # guidance 1: one row per request, so 8 requests fill the batch of 8 rows
            out.append(RequestSpec(model=model, prompt=f"a cat {i}", seed=i, steps=50, guidance_scale=1.0,
                                   controlnets=controls, ip_adapters=ips))
        return out

    configs = {
        "none": specs(),
        "controlnet on 4 of 8 rows": specs(controlled=4),
        "controlnet on 8 of 8 rows": specs(controlled=8),
        "ip-adapter on 4 of 8 rows": specs(ip_rows=4),
        "ip-adapter on 8 of 8 rows": specs(ip_rows=8),
    }
    step_seconds(engine, configs["none"][:1] * 1, 1)  # warm-up: load the model
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in tqdm(range(args.repeats), desc="rounds"):
        for name, config in configs.items():  # interleaved: machine noise hits every config alike
            seconds[name].extend(step_seconds(engine, config, 1))
    median = {name: statistics.median(v) for name, v in seconds.items()}
    base = median["none"]
    print(f"\nper-request conditioning: SD1.5-shaped UNet (random weights), 32x32 latents, batch of 8 rows; "
          f"{machine()['cpu']}, {machine()['torch_threads']} threads\n")
    print_table(["batch", "step s (median)", "vs no conditioning"],
                [[name, median[name], f"{median[name] / base:.2f}x"] for name in configs])
    cn4, cn8 = median["controlnet on 4 of 8 rows"] - base, median["controlnet on 8 of 8 rows"] - base
    print(f"\nControlNet cost on 4 rows / on 8 rows: {cn4 / cn8:.2f} (1.0 would mean it ran on every row)")
    path = write_json("conditioning", {"command": "python -m bench.conditioning", "seconds": seconds,
                                       "median": median, "controlnet_4_over_8": cn4 / cn8})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Stream previews: error against the full VAE decode and cost per step, per preview decoder.

    python -m bench.preview [--model default] [--held-out 8] [--repeats 30] [--out FILE.json]

Held-out data (captions, scenes and seeds the shipped fit did not see; seed 1000): the model's
own final latents for `--held-out` generated images (captured where the engine decodes them, so
exactly what the UNet produced) and as many shapes-world renders encoded by the model's VAE. The
target is the full VAE decode, area-averaged to latent resolution; the error is the mean absolute
difference in units of 1/255. Decoders: SD's fixed factors (the old previews), a linear 3x3 map
and the 3x3 -> 16 -> 3 net, both fitted here on the fit's data (seed 0, as
`sdserve models fit-preview` draws it), and the file the model ships (if any). Cost: the median
time of one preview call on one request's latents, against the median denoise step of one request
of the model's default size and steps run alone (3 runs). Prints a table; writes JSON (default:
$TMPDIR/sdserve-bench/preview.json, outside the checkout).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import write_json


def capture_generated(engine, model_name: str, count: int, seed: int):
    """PreviewData of `count` generated images: the UNet's final latents as the engine decodes them."""
    from sdserve.engine import engine as engine_module
    from sdserve.engine.preview_fit import PreviewData, _scenes, decode_targets, generate_images

    info = engine.model_info(model_name)
    prompts, _ = _scenes(count, seed, info.defaults.width)
    captured: list[torch.Tensor] = []
    original = engine_module.decode_latents

    def recording(model, latents):  # bench only: the engine keeps its latents to itself
        captured.append(latents.detach().float().cpu().clone())
        return original(model, latents)

    engine_module.decode_latents = recording
    try:
        generate_images(engine, info.name, prompts, seed, None)
    finally:
        engine_module.decode_latents = original
    latents = torch.cat(captured)[:count]  # [N, C, h, w]
    return PreviewData(latents, decode_targets(engine.models.get(info.name), latents))


def time_call(fn, argument, repeats: int) -> list[float]:
    fn(argument)  # warm
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(argument)
        samples.append(time.perf_counter() - start)
    return samples


def denoise_steps(engine, model_name: str, runs: int) -> list[float]:
    from sdserve.api.types import RequestSpec

    per_step = []
    for run in range(runs):
        request = engine.validate(RequestSpec(model=model_name, prompt="a red circle", seed=run))
        (outcome,) = engine.generate([request])
        per_step.append(outcome.timings["denoise"] / request.steps)
    return per_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="built-in name or directory (default: default)")
    parser.add_argument("--held-out", type=int, default=8, help="held-out generated images, and as many renders")
    parser.add_argument("--fit-generated", type=int, default=24, help="generated images of the fit (as fit-preview)")
    parser.add_argument("--fit-rendered", type=int, default=48, help="renders of the fit (as fit-preview)")
    parser.add_argument("--repeats", type=int, default=30, help="timed preview calls per decoder")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sdserve-bench" / "preview.json")
    args = parser.parse_args(argv)

    from sdserve.engine import Engine, EngineConfig
    from sdserve.engine.preview import PREVIEW_FILE, FittedPreview, VaePreview, sd_factors_preview
    from sdserve.engine.preview_fit import fit_linear, fit_net, mean_abs_error, preview_data

    engine = Engine(EngineConfig())
    info = engine.model_info(args.model)
    model = engine.models.get(info.name)
    started = time.perf_counter()
    fit_data = preview_data(engine, info.name, args.fit_generated, args.fit_rendered, 0)
    held_generated = capture_generated(engine, info.name, args.held_out, 1000)
    held_rendered = preview_data(engine, info.name, 0, args.held_out, 1000)
    data_s = time.perf_counter() - started
    decoders = {"sd-factors (old)": sd_factors_preview}
    started = time.perf_counter()
    decoders["linear 3x3 (least squares)"] = fit_linear(fit_data, 3, 1e-3)
    linear_s = time.perf_counter() - started
    started = time.perf_counter()
    decoders["net 3x3-16-3 (600 Adam steps)"] = fit_net(fit_data, 3, 16, 600, 0)
    net_s = time.perf_counter() - started
    shipped = Path(info.path) / PREVIEW_FILE
    if shipped.is_file():
        decoders["shipped file"] = FittedPreview.load(shipped)
    decoders["own VAE, area-averaged"] = VaePreview(model)

    step_s = denoise_steps(engine, info.name, 3)
    one = held_generated.latents[0]
    rows = []
    baseline = {}
    for name, decoder in decoders.items():
        errors = {"generated": mean_abs_error(decoder, held_generated), "rendered": mean_abs_error(decoder, held_rendered)}
        if not baseline:
            baseline = errors
        cost = time_call(decoder, one, args.repeats)
        rows.append({"decoder": name, "mae_255_generated": errors["generated"], "mae_255_rendered": errors["rendered"],
                     "vs_old_generated": errors["generated"] / baseline["generated"],
                     "vs_old_rendered": errors["rendered"] / baseline["rendered"],
                     "preview_ms": 1000 * statistics.median(cost), "preview_ms_range": [1000 * min(cost), 1000 * max(cost)],
                     "vs_denoise_step": statistics.median(cost) / statistics.median(step_s)})

    print(f"model {info.name}: {info.defaults.width}x{info.defaults.height}, latents {list(one.shape)}, "
          f"{info.defaults.steps} steps; held out: {args.held_out} generated + {args.held_out} rendered")
    print(f"denoise step (one request alone): median {1000 * statistics.median(step_s):.1f} ms "
          f"(runs {', '.join(f'{1000 * s:.1f}' for s in step_s)})")
    header = f"{'decoder':32} {'MAE gen':>8} {'x old':>6} {'MAE rend':>9} {'x old':>6} {'ms/call':>8} {'x step':>7}"
    print(header)
    for row in rows:
        print(f"{row['decoder']:32} {row['mae_255_generated']:8.1f} {row['vs_old_generated']:6.2f} "
              f"{row['mae_255_rendered']:9.1f} {row['vs_old_rendered']:6.2f} {row['preview_ms']:8.2f} "
              f"{row['vs_denoise_step']:7.3f}")
    print(f"(MAE in 1/255 against the full VAE decode area-averaged to latent size; data {data_s:.0f} s, "
          f"linear fit {linear_s:.2f} s, net fit {net_s:.1f} s)", file=sys.stderr)
    path = write_json("preview", {
        "model": info.name, "size": [info.defaults.width, info.defaults.height], "latent_shape": list(one.shape),
        "steps": info.defaults.steps, "held_out": args.held_out, "fit": [args.fit_generated, args.fit_rendered],
        "denoise_step_s": step_s, "fit_seconds": {"data": data_s, "linear": linear_s, "net": net_s},
        "rows": rows, "torch_threads": torch.get_num_threads(),
        "target_mean_255": float(np.mean(held_generated.targets)),
    }, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

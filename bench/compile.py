"""Compile: onnxruntime against eager per UNet step, and what fuse, export and refit cost.

All on the SD1.5-shaped UNet with random weights (bench/sd15.py: no download), float32 on the
CPU, text context [batch, 77, 768], latents 32x32 (a 256 px image):

  step        one UNet forward at batch 1, 4, 8: eager torch vs the exported graph in an
              onnxruntime session (CPU provider, as many intra-op threads as torch uses), timed
              back to back in each repeat; the ratio is the median of those paired ratios (robust
              to load drifting on a shared machine), the spread their min..max
  export      `compile onnx`'s UNet step: trace to ONNX with external weights, written once
  fuse        fold a rank-16 LoRA over every attention projection into the weights (`fuse.fold`)
  re-export   fuse + export of the fused UNet (what a new stack costs without refit)
  refit       `compile refit` of the export for that LoRA (no check: the check re-runs torch),
              which reads the touched initializers, adds the stack and writes them (the graph
              and weights stay in the export, read in place)

Where onnxruntime is not faster at batch 1, an onnxruntime profile of batch-1 runs says where the
time goes (share of node time per operator type).

    python -m bench.compile [--repeats 5] [--batches 1,4,8] [--work DIR] [--out FILE]
    python -m bench.compile --quick      # batches 1 and 4, 2 repeats
    python -m bench.compile --work DIR --reuse-export   # skip the first export (a run left it in DIR)
    python -m bench.compile --refit-only --repeats 3    # no step timing; re-export and refit 3x each

The export and refit (~3.4 GB each) go to a temporary directory outside the source tree unless
--work names one; JSON to bench/results/compile.json (ignored by git) unless --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import print_table, write_json
from bench.sd15 import SD15_UNET_CONFIG, attention_targets, random_lora_file, sd15_unet

LENGTH = 77
GOALS = {"step_batch1": 1.25, "refit_vs_reexport": 10.0}


def _inputs(batch: int, latent: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=generator),  # [B, 4, h, w]
        "timestep": torch.full((batch,), 500.0),  # [B]
        "encoder_hidden_states": torch.randn(batch, LENGTH, SD15_UNET_CONFIG["cross_attention_dim"],
                                             generator=generator),  # [B, 77, 768]
    }


def export_unet(unet: torch.nn.Module, directory: Path, latent: int) -> dict[str, Any]:
    """The UNet graph as `compile onnx` writes it, with a one-component manifest that `compile
    refit` reads; -> {"seconds", "refit_targets"}."""
    from sdserve import __version__
    from sdserve.adapters import targets_of
    from sdserve.compile.manifest import Check, Component, Manifest, write_manifest
    from sdserve.compile.onnx_export import _export_one, _graph_facts
    from sdserve.compile.onnx_graphs import unet_spec

    spec = unet_spec(unet, torch.float32, LENGTH)
    started = time.perf_counter()
    _export_one(spec, directory / "unet", opset=17, example=_inputs(2, latent, 0))
    seconds = time.perf_counter() - started
    inputs, outputs, dtype, refit = _graph_facts(directory / "unet", spec, targets_of({"unet": unet}))
    component = Component(name="unet", graph="unet/model.onnx", weights="unet/model.onnx.data",
                          config="unet/config.json", inputs=inputs, outputs=outputs, dtype=dtype,
                          check=Check(0.0, 0.0, 1e-3, ()), refit=refit)
    write_manifest(directory, Manifest(kind="onnx", sdserve_version=__version__, base="bench-sd15-unet",
                                       base_digest="", family="sd1", opset=17, fp16=False,
                                       components={"unet": component}, files=()))
    return {"seconds": seconds, "refit_targets": len(refit)}


def _session(path: Path, threads: int, profile: Path | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # onnxruntime's spin-waiting threads are what OMP_WAIT_POLICY=PASSIVE turns off for torch
    # (bench/common's rule): on shared cores a spinning pool burns the share the other one needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_steps(unet, session, batches: list[int], latent: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for batch in batches:
        inputs = _inputs(batch, latent, batch)
        feed = {name: tensor.numpy() for name, tensor in inputs.items()}
        with torch.inference_mode():
            want = unet(**inputs, return_dict=False)[0]  # warm-up, and the reference
        got = session.run(None, feed)[0]
        error = float(np.abs(got - want.numpy()).max() / np.abs(want.numpy()).max())
        eager, ort = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            with torch.inference_mode():
                unet(**inputs, return_dict=False)
            eager.append(time.perf_counter() - started)
            started = time.perf_counter()
            session.run(None, feed)
            ort.append(time.perf_counter() - started)
        ratios = [e / o for e, o in zip(eager, ort)]
        print(f"  batch {batch}: eager {statistics.median(eager):.2f} s, onnxruntime {statistics.median(ort):.2f} s",
              flush=True)
        rows.append({"batch": batch, "eager_s": statistics.median(eager), "onnxruntime_s": statistics.median(ort),
                     "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                     "max_rel_error": error, "eager_all": eager, "onnxruntime_all": ort})
    return rows


def profile_batch1(graph: Path, threads: int, latent: int, runs: int, work: Path) -> dict[str, Any]:
    """Share of onnxruntime's node time per operator type over `runs` batch-1 forwards."""
    session = _session(graph, threads, profile=work / "ort-profile")
    feed = {name: tensor.numpy() for name, tensor in _inputs(1, latent, 1).items()}
    session.run(None, feed)  # warm-up, excluded below by taking the last `runs` runs' events
    for _ in range(runs):
        session.run(None, feed)
    trace = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    model_runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = model_runs[-runs]["ts"] if len(model_runs) >= runs else 0
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= start:
            per_op[event["args"].get("op_name", "?")] += event["dur"]
    total = sum(per_op.values())
    run_total = sum(e["dur"] for e in model_runs[-runs:])
    shares = sorted(((op, dur / total) for op, dur in per_op.items()), key=lambda item: -item[1])
    return {"node_share": dict(shares), "node_ms_per_run": total / runs / 1e3,
            "run_ms": run_total / runs / 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 4, 2 repeats")
    parser.add_argument("--work", type=Path, help="where the export and refit go (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/compile.json)")
    parser.add_argument("--refit-only", action="store_true",
                        help="skip the step timing; fuse + re-export and refit --repeats times each (interleaved)")
    parser.add_argument("--reuse-export", action="store_true",
                        help="use the export an earlier run left in --work (the export time is then the re-export's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = "1,4", 2
    batches = [int(b) for b in args.batches.split(",")]
    threads = torch.get_num_threads()
    work = args.work or Path(tempfile.mkdtemp(prefix="sdserve-bench-compile-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run(args, batches, threads, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report(results, args)


def run(args: argparse.Namespace, batches: list[int], threads: int, work: Path) -> dict[str, Any]:
    import os

    import onnxruntime

    from sdserve.adapters import targets_of
    from sdserve.compile.fuse import fold
    from sdserve.compile.manifest import read_manifest
    from sdserve.compile.refit import RefitConfig, refit
    from sdserve.compile.source import LoRAArg, load_stack_for

    load_before = os.getloadavg()
    unet = sd15_unet()
    if args.reuse_export and (work / "export" / "sdserve-compile.json").is_file():
        # The same seeded UNet exported by an earlier run in --work: the export time is then
        # the re-export's (the fused UNet's: the same graph, other weight values).
        print(f"reusing the export in {work}", flush=True)
        export = {"seconds": None, "refit_targets": len(read_manifest(work / "export").components["unet"].refit)}
    else:
        print(f"exporting the SD1.5-shaped UNet to {work} ...", flush=True)
        export = export_unet(unet, work / "export", args.latent)
    graph = work / "export" / "unet" / "model.onnx"
    steps, profile = [], None
    if not args.refit_only:
        session = _session(graph, threads)
        print("timing steps ...", flush=True)
        steps = time_steps(unet, session, batches, args.latent, args.repeats)
        del session
        gc.collect()
    if steps and steps[0]["batch"] == 1 and steps[0]["speedup"] < GOALS["step_batch1"]:
        print("profiling onnxruntime at batch 1 ...", flush=True)
        profile = profile_batch1(graph, threads, args.latent, max(2, args.repeats), work)

    targets = attention_targets(targets_of({"unet": unet}))
    lora = work / "lora.safetensors"
    random_lora_file(lora, targets, args.rank, seed=1)
    stack = load_stack_for(targets, "sd1", [LoRAArg(lora, 0.8)])
    fuse_all, reexport_all, refit_all = [], [], []
    for repeat in range(args.repeats if args.refit_only else 1):
        started = time.perf_counter()
        # A repeat folds the stack in again (the weights drift; the time does not)
        fold({"unet": unet}, stack)
        fuse_all.append(time.perf_counter() - started)
        print(f"re-exporting the fused UNet ({repeat + 1}) ...", flush=True)
        reexport = export_unet(unet, work / "fused-export", args.latent)
        shutil.rmtree(work / "fused-export", ignore_errors=True)
        reexport_all.append(fuse_all[-1] + reexport["seconds"])
        started = time.perf_counter()
        refit(RefitConfig(onnx=work / "export", out=work / "refit", loras=(LoRAArg(lora, 0.8),), progress=False,
                          force=True, check=False))
        refit_all.append(time.perf_counter() - started)
        print(f"  re-export {reexport_all[-1]:.1f} s, refit {refit_all[-1]:.2f} s", flush=True)
    ratios = [r / f for r, f in zip(reexport_all, refit_all)]
    export_s = export["seconds"] or reexport_all[0] - fuse_all[0]
    return {"steps": steps, "profile": profile, "export_s": export_s,
            "export_reused": export["seconds"] is None, "refit_targets": export["refit_targets"],
            "lora_modules": len(targets), "fuse_s": statistics.median(fuse_all),
            "reexport_s": statistics.median(reexport_all), "refit_s": statistics.median(refit_all),
            "refit_ratio": statistics.median(ratios), "refit_ratio_min": min(ratios), "refit_ratio_max": max(ratios),
            "fuse_all": fuse_all, "reexport_all": reexport_all, "refit_all": refit_all,
            "threads": threads, "onnxruntime": onnxruntime.__version__,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    steps = results["steps"]
    print(f"\nSD1.5-shaped UNet, float32, {args.latent}x{args.latent} latents, {results['threads']} threads, "
          f"{args.repeats} repeats (median; spread = min..max of the paired ratios); load average "
          f"{results['loadavg_before'][0]:.1f} before, {results['loadavg_after'][0]:.1f} after (a shared machine):\n")
    if steps:  # none with --refit-only
        print_table(
            ["batch", "eager s/step", "onnxruntime s/step", "speedup", "spread", "max rel err", "goal"],
            [[s["batch"], s["eager_s"], s["onnxruntime_s"], f"{s['speedup']:.2f}x",
              f"{s['speedup_min']:.2f}..{s['speedup_max']:.2f}", f"{s['max_rel_error']:.1e}",
              f">= {GOALS['step_batch1']}x" if s["batch"] == 1 else ""] for s in steps],
        )
    ratio = results["refit_ratio"]
    spread = (f", spread {results['refit_ratio_min']:.1f}..{results['refit_ratio_max']:.1f}x over "
              f"{len(results['refit_all'])} repeats" if len(results["refit_all"]) > 1 else "")
    print(f"\nrank-{args.rank} LoRA on {results['lora_modules']} attention projections "
          f"({results['refit_targets']} weights in the refit map):\n")
    print_table(
        ["step", "seconds", "note"],
        [["export (trace + write)", results["export_s"], "of the fused UNet (--reuse-export)" if results["export_reused"]
          else ""],
         ["fuse (fold into weights)", results["fuse_s"], ""],
         ["re-export (fuse + export)", results["reexport_s"], ""],
         ["refit (no check)", results["refit_s"], f"{ratio:.1f}x faster than re-export{spread} "
                                                  f"(goal >= {GOALS['refit_vs_reexport']:g}x)"]],
    )
    if results["profile"]:
        profile = results["profile"]
        top = list(profile["node_share"].items())[:6]
        print(f"\nonnxruntime at batch 1: {profile['run_ms']:.0f} ms per run, {profile['node_ms_per_run']:.0f} ms "
              f"in nodes; node time by operator: " + ", ".join(f"{op} {share:.0%}" for op, share in top))
    path = write_json("compile", {"args": vars(args) | {"work": str(args.work), "out": str(args.out)},
                                  "model": "SD1.5-shaped UNet (random weights, bench/sd15.py)", **results},
                      out=args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

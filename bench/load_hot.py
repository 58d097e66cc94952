"""A share of the load uses one hot stack, served with and without its compiled variant.

    python -m bench.load --hot 0.5                       # open loop 6 req/s, then closed loop 12
    python -m bench.load --hot 0.5 --rate 8 --duration 20

Two sdserve servers (each its own process with one torch thread, the load bench's config) get the
same request sequence, one at a time (in the other order at the next load): "eager" serves every
stack per row; "variant" also has `[[variants]]` = the hot stack fused by `sdserve compile fuse`
(issue 20 item 4). The hot stack
is two of tenant 0's adapters at fixed scales with full windows, sent by tenant 0; the other
requests are the load bench's usual mix (bench/load_gen.py::make_request: Zipf adapters, stacks
of 0-3, sliders starting late, mixed steps and schedulers). Reported per server and load:
throughput and latency of all requests, of the hot ones and of the others (their p99 is what
the variant must not make worse).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.baselines import free_port, server_command, server_env, stop_server, wait_serving
from bench.common import machine, print_table, write_json
from bench.load_gen import (
    Workload,
    adapter_name,
    drive,
    is_slider,
    load_label,
    make_adapter_files,
    make_request,
    summarize,
    upload_adapters,
)

TENANTS = 4
ADAPTERS = 32
HOT_SCALES = (0.8, 1.0)
SERVERS = ("eager", "variant")


def hot_stack(workload: Workload) -> list[tuple[int, float]]:
    """(adapter index, scale): tenant 0's first two adapters that are not sliders."""
    owned = [i for i in range(workload.adapters) if i % workload.tenants == 0 and not is_slider(i)]
    if len(owned) < len(HOT_SCALES):
        raise SystemExit(f"--hot needs at least {len(HOT_SCALES)} non-slider adapters of tenant 0")
    return list(zip(owned, HOT_SCALES))


def hot_maker(fraction: float, stack: list[tuple[int, float]], flags: list[bool]
              ) -> Callable[[Any, Any], tuple[int, dict[str, Any]]]:
    """Requests as make_request draws them, a `fraction` of them given the hot stack (by tenant 0);
    flags[i] says whether request i was hot. The same seed gives the same sequence."""
    def make(workload: Workload, rng: Any) -> tuple[int, dict[str, Any]]:
        hot = rng.random() < fraction
        tenant, request = make_request(workload, rng)  # prompt, seed, steps, scheduler as usual
        flags.append(hot)
        if hot:
            request["adapters"] = [{"name": adapter_name(i), "scale": scale} for i, scale in stack]
            tenant = 0
        return tenant, request
    return make


@contextlib.contextmanager
def _server(name: str, work_dir: Path, model: str, variant: Path | None, log_dir: Path) -> Iterator[str]:
    port = free_port()
    data_dir = work_dir / f"{name}-data"
    data_dir.mkdir(parents=True)
    command = server_command("sdserve", port, data_dir, model, TENANTS, max_rows=32, cache=8)
    if variant is not None:
        command += ["--variant", str(variant)]
    log = log_dir / f"server-hot-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=server_env())
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(target, process, log)
        yield target
    finally:
        stop_server(process)


def fuse_hot(model: str, paths: list[Path], stack: list[tuple[int, float]], out: Path) -> Path:
    from sdserve.compile.fused_model import FuseConfig, fuse_model
    from sdserve.compile.source import LoRAArg

    fuse_model(FuseConfig(model=model, out=out, progress=False,
                          loras=tuple(LoRAArg(paths[i], scale) for i, scale in stack)))
    return out


def run_hot(fraction: float, out: Path, *, model: str = "tiny-sd1", rates: tuple[float, ...] = (6.0,),
            concurrency: int | None = 12, duration: float = 15.0, timeout: float = 20.0, slo: float = 2.0,
            seed: int = 0) -> int:
    workload = Workload(model=model, tenants=TENANTS, adapters=ADAPTERS, seed=seed)
    stack = hot_stack(workload)
    runs: list[dict[str, Any]] = []
    adapter_dir = out.parent / "adapters"
    paths = make_adapter_files(model, ADAPTERS, adapter_dir)
    with tempfile.TemporaryDirectory(prefix="sdserve-load-hot-") as tmp, contextlib.ExitStack() as servers:
        variant = fuse_hot(model, paths, stack, Path(tmp) / "hot-fused")
        targets = {name: servers.enter_context(_server(name, Path(tmp), model, variant if name == "variant" else None,
                                                       out.parent))
                   for name in SERVERS}
        for target in targets.values():
            upload_adapters(target, model, ADAPTERS, TENANTS, adapter_dir)
            warm = Workload(model=model, tenants=TENANTS, adapters=ADAPTERS, seed=seed + 99)
            asyncio.run(drive(target, warm, concurrency=2, duration=3.0, max_requests=100, timeout=timeout,
                              progress=False, make=hot_maker(fraction, stack, [])))
        loads = [(rate, None) for rate in rates] + ([(None, concurrency)] if concurrency else [])
        for turn, (rate, closed) in enumerate(loads):
            # Servers take turns, in the other order at the next load, so a change in the machine's
            # background load does not always favour the same one.
            for name in SERVERS if turn % 2 == 0 else SERVERS[::-1]:
                target = targets[name]
                flags: list[bool] = []
                label = load_label(rate, closed)
                records = asyncio.run(drive(target, workload, rate=rate, concurrency=closed, duration=duration,
                                            max_requests=int((rate or 20) * duration * 2) + 10, timeout=timeout,
                                            label=f"{name} {label}", make=hot_maker(fraction, stack, flags)))
                subsets = {"all": records, "hot": [r for r in records if flags[r.index]],
                           "other": [r for r in records if not flags[r.index]]}
                runs.append({"server": name, "load": label, "rate": rate, "concurrency": closed,
                             "summaries": {k: summarize(v, slo) for k, v in subsets.items()}})
    rows = [[r["server"], r["load"], subset, s["requests"], s["ok"], s["throughput_rps"],
             s["latency_p50"] or float("nan"), s["latency_p99"] or float("nan"),
             ",".join(f"{k}:{v}" for k, v in sorted(s["errors"].items())) or "-"]
            for r in runs for subset, s in r["summaries"].items()]
    print(f"\nhot stack: {100 * fraction:.0f} % of requests use {stack} (tenant 0), the rest the load bench's mix; "
          f"{model}, {TENANTS} tenants, {ADAPTERS} adapters; {machine()['cpu']}\n")
    print_table(["server", "load", "requests", "sent", "ok", "thr req/s", "p50 s", "p99 s", "errors"], rows)
    ratios = []
    for label in dict.fromkeys(r["load"] for r in runs):
        by = {r["server"]: r["summaries"] for r in runs if r["load"] == label}
        if set(by) == set(SERVERS):
            ratios.append({"load": label, "throughput_variant_over_eager": _ratio(by, "all", "throughput_rps"),
                           "hot_p99_variant_over_eager": _ratio(by, "hot", "latency_p99"),
                           "other_p99_variant_over_eager": _ratio(by, "other", "latency_p99"),
                           "all_p99_variant_over_eager": _ratio(by, "all", "latency_p99")})
    print()
    print_table(["load", "thr variant/eager", "p99 all v/e", "p99 hot v/e", "p99 other v/e"],
                [[x["load"], x["throughput_variant_over_eager"], x["all_p99_variant_over_eager"],
                  x["hot_p99_variant_over_eager"], x["other_p99_variant_over_eager"]] for x in ratios])
    command = f"python -m bench.load --hot {fraction:g}"
    path = write_json("load_hot", {"command": command, "fraction": fraction, "hot_stack": stack, "duration": duration,
                                   "runs": runs, "ratios": ratios}, out)
    print(f"wrote {path}")
    unexpected = sum(r["summaries"]["all"]["unexpected_errors"] for r in runs)
    return 1 if unexpected else 0


def _ratio(by: dict[str, dict[str, dict]], subset: str, key: str) -> float:
    """variant / eager of one summary value (nan where either is missing)."""
    ours, theirs = by["variant"][subset][key], by["eager"][subset][key]
    return ours / theirs if ours is not None and theirs else float("nan")


def engine_cost(model: str = "tiny-sd1", requests: int = 8, steps: int = 6, rounds: int = 5) -> dict[str, Any]:
    """In-process, no server: the same batch of hot requests on the eager path (stack per row) and
    on the fused variant, alternating `rounds` times; CPU seconds of this process (one torch
    thread), which the machine's other load inflates far less than wall time."""
    import resource
    import time

    import torch

    from sdserve.api.types import AdapterSpec, RequestSpec
    from sdserve.engine import Engine, EngineConfig

    torch.set_num_threads(1)
    workload = Workload(model=model, tenants=TENANTS, adapters=ADAPTERS)
    stack = hot_stack(workload)
    paths = make_adapter_files(model, ADAPTERS, Path(tempfile.gettempdir()) / "sdserve-load-hot-adapters")
    engine = Engine(EngineConfig(max_batch_rows=2 * requests))

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    with tempfile.TemporaryDirectory(prefix="sdserve-hot-cost-") as tmp:
        fused = str(fuse_hot(model, paths, stack, Path(tmp) / "fused"))
        common = dict(prompt="a red circle", steps=steps, width=32, height=32, guidance_scale=7.5,
                      guidance_start=0.0, guidance_end=1.0)
        adapters = tuple(AdapterSpec(path=str(paths[i]), scale=scale) for i, scale in stack)
        specs = {"eager": [RequestSpec(model=model, adapters=adapters, seed=s, **common) for s in range(requests)],
                 "variant": [RequestSpec(model=fused, seed=s, **common) for s in range(requests)]}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in specs}
        for round_index in range(rounds + 1):  # round 0 warms up (loads, plans, caches)
            for name in (SERVERS if round_index % 2 == 0 else SERVERS[::-1]):
                batch = [engine.validate(spec) for spec in specs[name]]
                c0, w0 = cpu(), time.perf_counter()
                outcomes = engine.generate(batch)
                c1, w1 = cpu(), time.perf_counter()
                assert not any(isinstance(o, Exception) for o in outcomes), outcomes
                if round_index:
                    times[name].append((c1 - c0, w1 - w0))
    summary = {name: {"cpu_s_median": sorted(c for c, _ in t)[len(t) // 2],
                      "wall_s_median": sorted(w for _, w in t)[len(t) // 2]} for name, t in times.items()}
    return {"model": model, "requests": requests, "steps": steps, "rounds": rounds, "stack": stack,
            "times": times, "summary": summary,
            "eager_over_variant_cpu": summary["eager"]["cpu_s_median"] / summary["variant"]["cpu_s_median"]}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="CPU cost of a batch of hot requests, eager vs fused variant")
    parser.add_argument("--model", default="tiny-sd1")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = engine_cost(args.model, args.requests, args.steps, args.rounds)
    print(json.dumps({k: v for k, v in result.items() if k != "times"}, indent=2))

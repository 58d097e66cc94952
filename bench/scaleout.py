"""Scale-out on Ray Serve (issue 22): 2 replicas vs 1, and adapter-affine vs adapter-blind routing.

    python -m bench.scaleout [--model tiny-sd1] [--requests 32] [--concurrency 8] [--steps 4]
                             [--adapters 64] [--zipf 1.1] [--resident 32] [--warmup-requests 192]
                             [--routing-requests 192] [--skip-throughput] [--out FILE]

Starts a local Ray instance (all cores), deploys sdserve's EngineReplica and drives the front's
RayDispatcher directly (validated EngineRequests in, events out): the gRPC front around it is the
single server's code, measured by bench.load.

1. Throughput: the same closed loop of bare requests (no adapters) on 1 replica, then on 2,
   one run each; the ratio 2/1 with each run's p50/p99 request latency as spread. Replicas are
   processes: on a 2-core machine two of them share the cores the one had (torch at 1 thread
   each), so the ratio says what a second process buys on the same cores, not on a second GPU.
2. Routing: for each policy a fresh deployment of 2 replicas whose adapter host tier holds
   `--resident` adapters each (by bytes), and requests of one LoRA each drawn from `--adapters`
   files with Zipf popularity (rank k has weight 1/k^s). The same draw for every policy: a warm-up
   of one request per adapter (shuffled) then `--warmup-requests` Zipf draws fills the caches and
   is not counted (the first load of every adapter is owed by any policy and would hide the
   difference); the next `--routing-requests` are counted. Policies:
   affine (sdserve's router: each stack's home replica by rendezvous hashing), multiplex (Ray
   Serve's model multiplexing keyed by the stack digests; its LRU set to `--resident` stacks),
   least_loaded (Ray Serve's power-of-two choices, blind to adapters: the issue's "round robin").
   Reported: adapter loads per request (files the replicas parsed, from their reports), p50/p99
   latency, requests per replica, and both ratios against least_loaded.
   What a router can save depends on the caches: with `--resident` at half the adapters, the two
   replicas together hold them all if each holds only its share (an LRU simulation of exact
   partitioning vs random placement, 64 adapters, Zipf 1.1, steady state: ~1.5x fewer loads at
   8 resident, ~2x at 16, 3-8x at 24-32).

JSON to bench/results/scaleout.json (ignored by git) unless --out.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, print_table, write_json
from bench.soak import make_lora_files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd1", help="built-in model or diffusers dir (default tiny-sd1)")
    parser.add_argument("--requests", type=int, default=32, help="bare requests per throughput run (default 32)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per request (default 4)")
    parser.add_argument("--size", type=int, default=64, help="image width and height (default 64)")
    parser.add_argument("--adapters", type=int, default=64, help="LoRA files in the routing run (default 64)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity (default 1.1)")
    parser.add_argument("--routing-requests", type=int, default=192,
                        help="requests per routing policy, counted after the warm-up (default 192)")
    parser.add_argument("--warmup-requests", type=int, default=192,
                        help="requests per routing policy that fill the caches first, not counted (default 192)")
    parser.add_argument("--resident", type=int, default=32,
                        help="adapters a replica's host tier holds, by bytes (default 8)")
    parser.add_argument("--spill-threshold", type=int, default=None,
                        help="affine routing's spill threshold (default: RayConfig's)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the routing comparison")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LoRA weights and the Zipf draw")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/scaleout.json)")
    return parser.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def zipf_draw(count: int, items: int, exponent: float, seed: int) -> list[int]:
    weights = [1.0 / (rank + 1) ** exponent for rank in range(items)]
    return random.Random(seed).choices(range(items), weights=weights, k=count)


class Driver:
    """Validates requests on a local engine (no weights) and runs them through a dispatcher."""

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        from sdserve.engine import Engine, EngineConfig

        self.engine = Engine(EngineConfig())
        self.model = model
        self.args = args
        self.counter = 0

    def request(self, seed: int, lora: tuple[Path, str] | None = None) -> Any:
        from sdserve.api.convert import spec_from_dict

        self.counter += 1
        body: dict[str, Any] = {"model": self.model, "prompt": "a red circle", "seed": seed,
                                "steps": self.args.steps, "width": self.args.size, "height": self.args.size}
        if lora is not None:
            body["adapters"] = [{"path": str(lora[0]), "scale": 1.0}]
        spec = spec_from_dict(body)
        if lora is not None:  # the server hands the engine the registry's digest with the file
            spec = dataclasses.replace(spec, adapters=(dataclasses.replace(spec.adapters[0], sha256=lora[1]),))
        return self.engine.validate(spec, request_id=f"bench-{self.counter}", tenant="bench")

    @staticmethod
    async def run(dispatcher: Any, requests: list[Any], concurrency: int) -> tuple[float, list[float], int]:
        """-> (wall seconds, per-request latencies, failures), a closed loop of `concurrency`."""
        latencies: list[float] = []
        failures = 0
        pending = list(requests)

        async def worker() -> None:
            nonlocal failures
            while pending:
                request = pending.pop(0)
                outcome: asyncio.Future = asyncio.get_running_loop().create_future()

                def listen(event: Any, outcome: asyncio.Future = outcome) -> None:
                    if event.kind in ("done", "error") and not outcome.done():
                        outcome.set_result(event)

                started = time.perf_counter()
                dispatcher.submit(request, listen)
                event = await outcome
                latencies.append(time.perf_counter() - started)
                failures += event.kind == "error"

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, failures


def deploy(config: Any, replicas: int, name: str, cpus: float, stacks: int = 16, routing: str | None = None,
           spill_threshold: int | None = None) -> Any:
    from sdserve.scaleout.cluster import deploy as deploy_app
    from sdserve.scaleout.config import RayConfig

    # The routing is the deployment's: "affine" installs sdserve's request router on it.
    chosen = {"routing": routing, "spill_threshold": spill_threshold}
    ray_config = RayConfig(replicas=replicas, app_name=name, cpus_per_replica=cpus, max_ongoing_requests=16,
                           stacks_per_replica=stacks, **{k: v for k, v in chosen.items() if v is not None})
    return deploy_app(config, ray_config), ray_config


def throughput(driver: Driver, config: Any, args: argparse.Namespace, cpus: int) -> list[dict[str, Any]]:
    from ray import serve

    from sdserve.scaleout.dispatch import RayDispatcher

    rows = []
    for replicas in (1, 2):
        name = f"bench-throughput-{replicas}"
        handle, ray_config = deploy(config, replicas, name, cpus / replicas)
        dispatcher = RayDispatcher(handle, ray_config)
        warm = [driver.request(seed) for seed in range(2 * replicas)]  # first calls pay for torch's set-up
        asyncio.run(Driver.run(dispatcher, warm, 2 * replicas))
        requests = [driver.request(1000 + i) for i in range(args.requests)]
        wall, latencies, failures = asyncio.run(Driver.run(dispatcher, requests, args.concurrency))
        rows.append({"replicas": replicas, "requests": args.requests, "wall_s": wall,
                     "throughput_rps": args.requests / wall, "p50_s": percentile(latencies, 0.5),
                     "p99_s": percentile(latencies, 0.99), "failures": failures,
                     "served_by": sorted(set(dispatcher.served_by.values()))})
        serve.delete(name)
    return rows


def routing(driver: Driver, config: Any, args: argparse.Namespace, cpus: int, work: Path) -> list[dict[str, Any]]:
    from ray import serve

    from sdserve.scaleout.config import AFFINE, LEAST_LOADED, MULTIPLEX
    from sdserve.scaleout.dispatch import RayDispatcher

    files, sizes = [], []
    for index, blob in enumerate(make_lora_files(args.model, args.adapters, args.seed)):
        path = work / f"lora-{index}.safetensors"
        path.write_bytes(blob)
        files.append((path, hashlib.sha256(blob).hexdigest()))
        sizes.append(len(blob))
    mean_bytes = statistics.mean(sizes)
    residency = dataclasses.replace(config.engine.residency, host_budget_bytes=int(args.resident * mean_bytes),
                                    device_slots=max(1, args.resident))
    routed = dataclasses.replace(config, engine=dataclasses.replace(config.engine, residency=residency))
    # One draw for every policy. The warm-up asks for every adapter once (shuffled), then follows
    # the Zipf draw; only the part after it is counted. So no counted load is an adapter's first
    # (owed by any policy): what is counted is what each policy's placement makes the caches evict.
    draw = zipf_draw(args.warmup_requests + args.routing_requests, args.adapters, args.zipf, args.seed)
    every = list(range(args.adapters))
    random.Random(args.seed).shuffle(every)
    warm_draw, measured_draw = every + draw[: args.warmup_requests], draw[args.warmup_requests :]
    rows = []
    for policy in (AFFINE, MULTIPLEX, LEAST_LOADED):
        # A deployment per policy: each starts with empty caches and its own router. Ray's
        # multiplexed LRU remembers as many stacks per replica as its cache holds: a longer
        # memory would send requests to a replica that evicted their adapters.
        name = f"bench-routing-{policy}"
        handle, ray_config = deploy(routed, 2, name, cpus / 2, stacks=args.resident, routing=policy,
                                    spill_threshold=args.spill_threshold)
        dispatcher = RayDispatcher(handle, ray_config)
        counter = 2000
        phases = {}
        for phase, part in (("warm-up", warm_draw), ("measured", measured_draw)):
            requests = [driver.request(counter + i, files[k]) for i, k in enumerate(part)]
            counter += len(part)
            before = sum(report.loads for report in dispatcher.book.reports.values())
            served_before = len(dispatcher.served_by)
            wall, latencies, failures = asyncio.run(Driver.run(dispatcher, requests, args.concurrency))
            loads = sum(report.loads for report in dispatcher.book.reports.values()) - before
            per_replica: dict[str, int] = {}
            for replica in list(dispatcher.served_by.values())[served_before:]:
                per_replica[replica] = per_replica.get(replica, 0) + 1
            phases[phase] = {"requests": len(requests), "adapter_loads": loads,
                             "loads_per_request": loads / max(1, len(requests)),
                             "p50_s": percentile(latencies, 0.5) if latencies else 0.0,
                             "p99_s": percentile(latencies, 0.99) if latencies else 0.0,
                             "wall_s": wall, "failures": failures,
                             "requests_per_replica": sorted(per_replica.values())}
        measured = phases["measured"]
        rows.append({"routing": policy, **measured, "warm_up": phases["warm-up"],
                     "distinct_adapters_measured": len(set(measured_draw))})
        serve.delete(name)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import ray

    from sdserve.scaleout.cluster import start_ray
    from sdserve.scaleout.config import RayConfig
    from sdserve.server.config import Config, ModelsConfig

    cpus = os.cpu_count() or 2
    config = Config(models=ModelsConfig(serve=(args.model,), default=args.model))
    started = start_ray(RayConfig(), num_cpus=cpus, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    driver = Driver(args.model, args)
    results: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    try:
        with tempfile.TemporaryDirectory(prefix="sdserve-bench-scaleout-") as work:
            if not args.skip_throughput:
                results["throughput"] = throughput(driver, config, args, cpus)
            results["routing"] = routing(driver, config, args, cpus, Path(work))
    finally:
        from ray import serve

        serve.shutdown()
        if started:
            ray.shutdown()
    print(f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, concurrency {args.concurrency}; "
          f"{cpus} cores: {machine()['cpu']}; load average at end {os.getloadavg()[0]:.1f}")
    if "throughput" in results:
        one, two = results["throughput"]
        print_table(["replicas", "req/s", "p50 s", "p99 s", "failures", "ratio vs 1"],
                    [[r["replicas"], r["throughput_rps"], r["p50_s"], r["p99_s"], r["failures"],
                      r["throughput_rps"] / one["throughput_rps"]] for r in (one, two)])
    rows = results["routing"]
    blind = rows[-1]  # least_loaded: the adapter-blind baseline
    print(f"routing: {args.adapters} adapters, Zipf {args.zipf}, {args.resident} resident per replica (by mean "
          f"file bytes); warm-up: each adapter once, then {args.warmup_requests} Zipf requests; "
          f"{args.routing_requests} counted")
    print_table(["routing", "loads/request", "p50 s", "p99 s", "requests per replica", "fewer loads vs blind",
                 "p99 vs blind"],
                [[r["routing"], r["loads_per_request"], r["p50_s"], r["p99_s"], r["requests_per_replica"],
                  blind["adapter_loads"] / max(1, r["adapter_loads"]), r["p99_s"] / blind["p99_s"]] for r in rows])
    path = write_json("scaleout", results, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

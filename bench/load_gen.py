"""The load generator's library: workload, requests, the drive loop, summaries.

`bench/load.py` is its command line (one target, or `--suite`); `bench/load_suite.py` runs the
grid against sdserve and the baselines. Both import this module; it imports neither.
"""


from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.baselines import tenant_keys
from bench.common import print_table

EXPECTED_FAILURES = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
# A request the generator itself cancelled: still open when the run's drain time ran out. It is
# the bench's cut-off, not the server's failure (reported as `cut_off`, never as unexpected).
CUT_OFF = "CANCELLED_BY_GENERATOR"
PROMPTS = ("a red circle", "a blue square on the left", "a cat in a hat", "a green triangle at the top",
           "a lighthouse at dusk", "an astronaut riding a horse")
RANKS = (4, 8, 16)


@dataclass(frozen=True)
class Workload:
    """What the generated requests look like; the same seed gives the same request sequence."""

    model: str = "tiny-sd1"
    tenants: int = 4
    adapters: int = 32
    zipf: float = 1.0
    max_stack: int = 3
    steps: tuple[int, ...] = (4, 6, 8)
    schedulers: tuple[str, ...] = ("euler", "euler_a", "dpmpp_2m", "ddim")
    size: int = 32
    guidance: float = 7.5
    seed: int = 0


@dataclass(frozen=True)
class Connection:
    """How the generator reaches a server it did not start: one API key per tenant, TLS."""

    keys: tuple[str, ...] = ()  # tenant i sends keys[i]; () = the bench servers' own keys
    tls: bool = False  # TLS against the system's CAs (or `ca`)
    ca: str | None = None  # PEM file of the CA that signed the server's certificate

    def tenant_keys(self, tenants: int) -> list[str]:
        if not self.keys:
            return tenant_keys(tenants)
        if len(self.keys) != tenants:
            raise ValueError(f"{tenants} tenants need {tenants} API keys, got {len(self.keys)}")
        return list(self.keys)

    @property
    def secure(self) -> bool:
        return self.tls or self.ca is not None


def adapter_name(index: int) -> str:
    return f"lora-{index:03d}"


def is_slider(index: int) -> bool:
    return index % 4 == 3


def make_adapter_files(model: str, count: int, directory: Path) -> list[Path]:
    """`count` random LoRA files for `model`'s UNet attention projections (cached by name)."""
    from diffusers import UNet2DConditionModel

    from bench.sd15 import attention_targets, random_peft_lora_file
    from sdserve.adapters import targets_of
    from sdserve.models.builtin import builtin_path

    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{model}-{adapter_name(i)}-r{RANKS[i % len(RANKS)]}.safetensors" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    unet = UNet2DConditionModel.from_pretrained(builtin_path(model), subfolder="unet")
    targets = attention_targets(targets_of({"unet": unet}))
    for i, path in enumerate(paths):
        if not path.exists():
            random_peft_lora_file(path, targets, RANKS[i % len(RANKS)], seed=1000 + i)
    return paths


def upload_adapters(target: str, model: str, count: int, tenants: int, directory: Path,
                    connection: Connection = Connection()) -> None:
    """Each tenant uploads the adapters it owns (adapter i belongs to tenant i mod N)."""
    from sdserve.client import Client

    keys = connection.tenant_keys(tenants)
    paths = make_adapter_files(model, count, directory)
    for tenant, key in enumerate(keys):
        with Client(target, api_key=key, timeout=60, tls=connection.tls, ca=connection.ca) as client:
            for i in range(tenant, count, tenants):
                client.upload_adapter(paths[i], name=adapter_name(i), family="sd1")


def _zipf_pick(rng: random.Random, candidates: list[int], k: int, s: float) -> list[int]:
    """k distinct candidates, each drawn with weight 1/(index+1)^s (without replacement)."""
    pool = list(candidates)
    picked = []
    for _ in range(min(k, len(pool))):
        weights = [1.0 / (c + 1) ** s for c in pool]
        choice = rng.choices(range(len(pool)), weights=weights)[0]
        picked.append(pool.pop(choice))
    return picked


def make_request(workload: Workload, rng: random.Random) -> tuple[int, dict[str, Any]]:
    """(tenant index, GenerateRequest as a dict) for the next request."""
    w = workload
    k = rng.choices(range(w.max_stack + 1), weights=(0.15, 0.4, 0.3, 0.15)[: w.max_stack + 1])[0]
    if k == 0 or w.adapters == 0:
        tenant, stack_ids = rng.randrange(w.tenants), []
    else:
        first = _zipf_pick(rng, list(range(w.adapters)), 1, w.zipf)[0]
        tenant = first % w.tenants
        owned = [i for i in range(w.adapters) if i % w.tenants == tenant and i != first]
        stack_ids = [first, *_zipf_pick(rng, owned, k - 1, w.zipf)]
    adapters = []
    for i in stack_ids:
        if is_slider(i):
            adapters.append({"name": adapter_name(i), "scale": rng.choice((-1.5, -1.0, 1.0, 1.5)),
                             "start": rng.choice((0.0, 0.25, 0.5))})
        else:
            adapters.append({"name": adapter_name(i), "scale": rng.choice((0.6, 0.8, 1.0))})
    request = {
        "model": w.model, "prompt": rng.choice(PROMPTS), "seed": rng.randrange(1 << 31),
        "steps": rng.choice(w.steps), "scheduler": rng.choice(w.schedulers), "guidance_scale": w.guidance,
        # guidance at every step, as the diffusers baseline runs it (a model's default interval,
        # e.g. `default`'s first quarter, would halve sdserve's rows and flatter it)
        "guidance_start": 0.0, "guidance_end": 1.0,
        "width": w.size, "height": w.size, "adapters": adapters,
    }
    return tenant, request


@dataclass
class Record:
    """One request as the generator saw it (seconds; None where it did not get that far)."""

    index: int
    tenant: int
    stack: int
    steps: int
    sent: float  # since the run's start
    status: str = "PENDING"
    latency: float | None = None
    first_progress: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


async def _one(stub: Any, record: Record, request: Any, metadata: list, timeout: float, start: float) -> None:
    import grpc

    sent = time.perf_counter()
    record.sent = sent - start
    try:
        async for event in stub.GenerateStream(request, timeout=timeout, metadata=metadata):
            kind = event.WhichOneof("event")
            if kind == "progress" and record.first_progress is None:
                record.first_progress = time.perf_counter() - sent
            elif kind == "result":
                t = event.result.timings
                record.timings = {"queue": t.queue, "adapter_load": t.adapter_load, "denoise": t.denoise,
                                  "decode": t.decode}
        record.latency = time.perf_counter() - sent
        record.status = "OK" if record.timings else "NO_RESULT"
    except grpc.aio.AioRpcError as exc:
        record.status = exc.code().name
    except asyncio.CancelledError:
        record.status = CUT_OFF
        raise


async def drive(target: str, workload: Workload, *, rate: float | None = None, concurrency: int | None = None,
                duration: float = 20.0, max_requests: int = 1000, timeout: float = 30.0,
                progress: bool = True, label: str = "load",
                make: Callable[[Workload, random.Random], tuple[int, dict[str, Any]]] = make_request,
                connection: Connection = Connection()) -> list[Record]:
    """Send requests for at most `duration` seconds and `max_requests` requests; wait for the
    answers at most `timeout` more; -> one Record per request sent. `make` draws the next
    (tenant, request); record i is the i-th request it made."""
    import grpc
    from tqdm import tqdm

    from sdserve.api import convert

    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate and concurrency")
    rng, arrivals = random.Random(workload.seed), random.Random(workload.seed + 1)
    metadata = [[("authorization", f"Bearer {key}")] for key in connection.tenant_keys(workload.tenants)]
    records: list[Record] = []
    expected = max_requests if rate is None else min(max_requests, int(rate * duration) + 1)
    bar = tqdm(total=expected, desc=label, unit="req", disable=not progress, leave=False, mininterval=1.0)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if connection.secure:
        from sdserve.client import tls_credentials

        channel = grpc.aio.secure_channel(target, tls_credentials(Path(connection.ca) if connection.ca else None),
                                          options=options)
    else:
        channel = grpc.aio.insecure_channel(target, options=options)
    async with channel:
        stub = convert.stubs(channel).generation
        start = time.perf_counter()

        def next_call() -> Any:
            tenant, request = make(workload, rng)
            record = Record(len(records), tenant, len(request["adapters"]), request["steps"], 0.0)
            records.append(record)
            return _one(stub, record, convert.pb_from_dict(request), metadata[tenant], timeout, start)

        def more() -> bool:
            return len(records) < max_requests and time.perf_counter() - start < duration

        tasks: list[asyncio.Task] = []
        if rate is not None:  # open loop: arrivals do not wait for answers
            due = start
            while more():
                due += arrivals.expovariate(rate)
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                if not more():
                    break
                task = asyncio.ensure_future(next_call())
                task.add_done_callback(lambda _: bar.update(1))
                tasks.append(task)
        else:
            async def worker() -> None:
                while more():
                    await next_call()
                    bar.update(1)

            tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency or 1)]
        # Every request sent gets `timeout` (its deadline) plus a margin to answer; closed-loop
        # workers may still be sending, so their drain starts when sending stops.
        drain = timeout + 5.0 + (max(0.0, duration - (time.perf_counter() - start)) if rate is None else 0.0)
        _, late = await asyncio.wait(tasks, timeout=drain) if tasks else (set(), set())
        for task in late:  # bounded in time: whatever is still open after the drain is cancelled
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    bar.close()
    return records


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(records: list[Record], slo: float) -> dict[str, Any]:
    ok = [r for r in records if r.status == "OK"]
    latencies = [r.latency for r in ok if r.latency is not None]
    first = [r.first_progress for r in ok if r.first_progress is not None]
    ends = [r.sent + r.latency for r in ok if r.latency is not None]
    span = (max(ends) - min(r.sent for r in records)) if ends else 0.0
    sent_span = max((r.sent for r in records), default=0.0)
    errors = Counter(r.status for r in records if r.status != "OK")
    phases = {k: float(np.mean([r.timings[k] for r in ok])) if ok else None
              for k in ("queue", "adapter_load", "denoise", "decode")}
    return {
        "requests": len(records), "ok": len(ok),
        "offered_rps": (len(records) - 1) / sent_span if sent_span > 0 else None,
        "throughput_rps": len(ok) / span if span > 0 else 0.0,
        "latency_p50": percentile(latencies, 50), "latency_p90": percentile(latencies, 90),
        "latency_p99": percentile(latencies, 99), "latency_mean": float(np.mean(latencies)) if latencies else None,
        "first_progress_p50": percentile(first, 50), "first_progress_p99": percentile(first, 99),
        "slo_seconds": slo, "slo_attainment": sum(1 for x in latencies if x <= slo) / len(records) if records else 0.0,
        "errors": dict(errors),
        "cut_off": errors.get(CUT_OFF, 0),
        "unexpected_errors": sum(n for code, n in errors.items() if code not in (*EXPECTED_FAILURES, CUT_OFF)),
        "mean_phase_seconds": phases,
    }


def run_one(target: str, workload: Workload, *, rate: float | None, concurrency: int | None, duration: float,
            max_requests: int, timeout: float, slo: float, label: str = "load", progress: bool = True,
            make: Callable[[Workload, random.Random], tuple[int, dict[str, Any]]] = make_request,
            connection: Connection = Connection()) -> dict:
    records = asyncio.run(drive(target, workload, rate=rate, concurrency=concurrency, duration=duration,
                                max_requests=max_requests, timeout=timeout, progress=progress, label=label,
                                make=make, connection=connection))
    return {"target": target, "rate": rate, "concurrency": concurrency, "duration": duration,
            "max_requests": max_requests, "timeout": timeout, "workload": asdict(workload),
            "summary": summarize(records, slo), "records": [asdict(r) for r in records]}


def load_label(rate: float | None, concurrency: int | None) -> str:
    return f"{rate:g}/s" if rate is not None else f"closed {concurrency}"


def print_summaries(rows: list[tuple[str, int, str, dict]]) -> None:
    print_table(
        ["system", "adapters", "load", "sent", "ok", "thr req/s", "p50 s", "p90 s", "p99 s", "TTFP p50 s",
         "SLO", "errors"],
        [[system, m, load, s["requests"], s["ok"], s["throughput_rps"], s["latency_p50"] or float("nan"),
          s["latency_p90"] or float("nan"), s["latency_p99"] or float("nan"),
          s["first_progress_p50"] or float("nan"), f"{100 * s['slo_attainment']:.0f}%",
          ",".join(f"{k}:{v}" for k, v in sorted(s["errors"].items())) or "-"]
         for system, m, load, s in rows],
    )

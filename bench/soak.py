"""Soak (hardening item 8): minutes of mixed, partly hostile, multi-tenant load; does anything grow?

    python -m bench.soak                   # 10 minutes against a fresh `sdserve serve` on tiny-sd1
    python -m bench.soak --minutes 30      # the long soak
    python -m bench.soak --minutes 1       # a quick check
    python -m bench.soak --target 127.0.0.1:50051 --keys K0,K1,K2 [--pid PID]   # a running server

The bench starts `sdserve serve` in a subprocess (3 keyed tenants, tiny-sd1, its own data
directory), uploads a few LoRAs per tenant (made here with PEFT from the built-in model's UNet,
no downloads) and keeps `--concurrency` calls in flight for `--minutes`. Each call is one of:

    generate, stream        normal calls, each tenant with its own LoRA stack     -> OK
    cancel                  GenerateStream cancelled after two progress events    -> CANCELLED (or OK)
    deadline                a long request with a 0.25 s deadline                  -> DEADLINE_EXCEEDED (or OK)
    bad_field               an invalid field (size, steps, scheduler, model, ...)  -> INVALID_ARGUMENT / NOT_FOUND
    unknown_adapter         names an adapter nobody uploaded                       -> NOT_FOUND
    malformed               bytes that are not a GenerateRequest                   -> INVALID_ARGUMENT
    bad_key                 a key no tenant has                                    -> UNAUTHENTICATED
    bad_upload              an upload of bytes that are not safetensors            -> INVALID_ARGUMENT
    churn                   upload, generate with it, delete (three calls)         -> OK each
                            (uploads may also meet the tenant's bound on concurrent uploads: RESOURCE_EXHAUSTED)
    list                    ListAdapters                                           -> OK

Every few seconds it samples the server process (psutil: RSS, open files, threads, child
processes). Results: RSS slope per completed call after the warm-up (least squares of RSS
against calls completed, with its standard error; goal < 1 KB per call), open files and threads
after the warm-up and at the end (goal: flat), p50/p99 of successful generations per minute
and the p99 drift (last minute / first post-warm-up minute), status codes per kind, and every
unexpected code (goal: none). A table is printed; the JSON goes to $SDSERVE_HOME/bench/soak.json
(or /tmp/sdserve-bench/soak.json), outside the source tree. Exits 1 on unexpected codes.

Bounded: the load stops at `--minutes` (and at `--max-calls`), every call has a deadline, calls
still open `--drain-seconds` after the end are cancelled, and the server subprocess is always
stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.load_gen import percentile

PROMPTS = ("a red circle", "a blue square on the left", "a cat in a hat", "a green triangle at the top",
           "a lighthouse at dusk")
SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "ddim")
STEPS = (4, 6, 8)
LORA_RANKS = (2, 4)
ADAPTERS_PER_TENANT = 2
TENANTS = 3
GENERATE_METHOD = "/sdserve.v1.ImageGeneration/Generate"

# How often each kind of call is made (relative weights).
MIX: dict[str, int] = {
    "generate": 30, "stream": 20, "cancel": 8, "deadline": 6, "bad_field": 10, "unknown_adapter": 5,
    "malformed": 5, "bad_key": 3, "bad_upload": 3, "churn": 5, "list": 3,
}
# The codes each kind of call may end with; anything else is an unexpected error. Uploads may
# be refused with RESOURCE_EXHAUSTED: a tenant may have 2 under way at once (RegistryConfig), and
# the workers share 3 tenants.
EXPECTED: dict[str, frozenset[str]] = {
    "generate": frozenset({"OK"}),
    "stream": frozenset({"OK"}),
    "cancel": frozenset({"CANCELLED", "OK"}),
    "deadline": frozenset({"DEADLINE_EXCEEDED", "OK"}),
    "bad_field": frozenset({"INVALID_ARGUMENT", "NOT_FOUND"}),
    "unknown_adapter": frozenset({"NOT_FOUND"}),
    "malformed": frozenset({"INVALID_ARGUMENT"}),
    "bad_key": frozenset({"UNAUTHENTICATED"}),
    "bad_upload": frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}),
    "churn_upload": frozenset({"OK", "RESOURCE_EXHAUSTED"}),
    "churn_generate": frozenset({"OK"}),
    "churn_delete": frozenset({"OK"}),
    "list": frozenset({"OK"}),
}
GENERATION_KINDS = ("generate", "stream")  # the calls whose latency is tracked per minute


@dataclass(frozen=True)
class SoakOptions:
    """One soak run."""

    minutes: float = 10.0
    """How long the load runs."""
    warmup_minutes: float | None = None
    """Left out of the RSS fit and the drift baseline; None = 1 minute, or a fifth of a shorter run."""
    target: str | None = None
    """A running server (loopback HOST:PORT) instead of starting one."""
    keys: tuple[str, ...] = ()
    """With `target`: the API keys of three tenants."""
    pid: int | None = None
    """With `target`: the server's process id, to sample it (without it nothing is sampled)."""
    model: str = "tiny-sd1"
    size: int = 32
    """Width and height of every generated image."""
    concurrency: int = 6
    """Calls in flight at once."""
    sample_seconds: float = 3.0
    max_calls: int = 200_000
    drain_seconds: float = 60.0
    """After the load stops, how long open calls may take before they are cancelled."""
    seed: int = 0
    out: Path | None = None
    """JSON output; None = $SDSERVE_HOME/bench/soak.json or /tmp/sdserve-bench/soak.json."""

    @property
    def warmup_seconds(self) -> float:
        minutes = self.warmup_minutes if self.warmup_minutes is not None else min(1.0, self.minutes / 5)
        return 60.0 * minutes


def results_root() -> Path:
    home = os.environ.get("SDSERVE_HOME")
    return Path(home) / "bench" if home else Path(tempfile.gettempdir()) / "sdserve-bench"


# -- the analysis: pure functions ----------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    slope: float  # dy/dx
    stderr: float  # standard error of the slope (nan with fewer than 3 points)
    intercept: float
    points: int


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> Fit:
    """Ordinary least squares y = slope·x + intercept, with the slope's standard error."""
    n = len(xs)
    if n != len(ys) or n < 2:
        return Fit(math.nan, math.nan, math.nan, n)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return Fit(math.nan, math.nan, mean_y, n)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    intercept = mean_y - slope * mean_x
    if n < 3:
        return Fit(slope, math.nan, intercept, n)
    residual = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    return Fit(slope, math.sqrt(residual / (n - 2) / sxx), intercept, n)


def latency_windows(ends: Sequence[float], latencies: Sequence[float], start: float, stop: float,
                    window: float) -> list[dict[str, Any]]:
    """p50/p99 of the latencies of calls that ended in each `window`-second span from `start`
    (the end of the warm-up) to `stop`; a last span shorter than half a window is dropped."""
    windows = []
    begin = start
    while begin + window / 2 <= stop:
        end = min(begin + window, stop)
        inside = [lat for t, lat in zip(ends, latencies) if begin <= t < end]
        windows.append({"from_s": round(begin, 1), "to_s": round(end, 1), "count": len(inside),
                        "p50": percentile(inside, 50), "p99": percentile(inside, 99)})
        begin += window
    return windows


def p99_drift(windows: Sequence[dict[str, Any]]) -> float | None:
    """p99 of the last window over the first's; None without two windows with calls."""
    filled = [w for w in windows if w["count"] and w["p99"]]
    if len(filled) < 2:
        return None
    return filled[-1]["p99"] / filled[0]["p99"]


def unexpected(kind: str, code: str) -> bool:
    return code not in EXPECTED.get(kind, frozenset())


# -- LoRA files: PEFT-made, from the built-in model (no downloads) ----------------------------------


def make_lora_files(model: str, count: int, seed: int) -> list[bytes]:
    """`count` PEFT-layout LoRA files (safetensors bytes) for `model`'s UNet attention, made as
    diffusers' `save_lora_weights` writes them: PEFT injects the adapter, A and B are random."""
    import safetensors.torch
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from sdserve.models.builtin import builtin_path

    unet = UNet2DConditionModel.from_pretrained(builtin_path(model), subfolder="unet")
    files = []
    for index in range(count):
        rank = LORA_RANKS[index % len(LORA_RANKS)]
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        adapted = inject_adapter_in_model(copy.deepcopy(config), copy.deepcopy(unet))
        generator = torch.Generator().manual_seed(seed + index)
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if "lora_" in name:  # PEFT starts B at zero: make every delta visible
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        tensors = {f"unet.{k}": v.detach().contiguous() for k, v in get_peft_model_state_dict(adapted).items()}
        packed = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True)}
        files.append(safetensors.torch.save(tensors, metadata=metadata))
    return files


# -- the server ----------------------------------------------------------------------------------


def tenant_keys() -> list[str]:
    return [f"soak-tenant-key-{i}" for i in range(TENANTS)]  # public test values


def server_config(port: int, data_dir: Path, model: str, keys: Sequence[str]) -> str:
    tenants = "".join(
        f'\n[[tenants]]\nname = "soak-{i}"\nkey_sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        for i, key in enumerate(keys)
    )
    return (f'[server]\nhost = "127.0.0.1"\nport = {port}\ngrace_seconds = 5.0\nlog_level = "WARNING"\n\n'
            f'[models]\nserve = ["{model}"]\n\n[registry]\ndata_dir = "{data_dir}"\n{tenants}')


@contextmanager
def launch_server(work: Path, model: str, keys: Sequence[str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """`sdserve serve` on a free loopback port; yields (target, process); always stopped on exit."""
    from bench.baselines import free_port, server_env, stop_server, wait_serving

    port = free_port()
    config = work / "server.toml"
    config.write_text(server_config(port, work / "data", model, keys))
    log = work / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "sdserve.cli.main", "serve", "--config", str(config)],
                                   stdout=out, stderr=subprocess.STDOUT, env=server_env())
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(target, process, log)
        yield target, process
    finally:
        stop_server(process)


# -- the load ----------------------------------------------------------------------------------


@dataclass
class Call:
    kind: str
    tenant: int
    ended: float  # seconds since the load started
    latency: float
    code: str
    details: str = ""


@dataclass
class Sample:
    t: float  # seconds since the load started (negative: before it)
    rss: int
    fds: int
    threads: int
    children: int
    children_rss: int
    calls: int  # calls completed so far
    generations: int  # successful generations so far


@dataclass
class Run:
    calls: list[Call] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    generations: int = 0


def _bad_fields(rng: random.Random, model: str, size: int) -> dict[str, Any]:
    """A request that breaks one rule."""
    base = {"model": model, "prompt": rng.choice(PROMPTS), "steps": 4, "width": size, "height": size}
    breaks = [
        {"width": size + 3}, {"height": 100_000}, {"steps": 100_000}, {"scheduler": "no-such-scheduler"},
        {"model": "no-such-model"}, {"guidance_scale": -5.0}, {"num_images": 10_000},
        {"adapters": [{"path": "/etc/passwd", "scale": 1.0}]}, {"adapters": [{"name": "../x", "scale": 1.0}]},
        {"strength": 7.0}, {"guidance_start": 0.9, "guidance_end": 0.1},
    ]
    return {**base, **rng.choice(breaks)}


class Soak:
    def __init__(self, options: SoakOptions, target: str, keys: Sequence[str], pid: int | None,
                 adapters: dict[int, list[str]], churn_files: list[bytes]) -> None:
        self.options = options
        self.target = target
        self.metadata = [[("authorization", f"Bearer {key}")] for key in keys]
        self.pid = pid
        self.adapters = adapters  # tenant -> its uploaded adapter names
        self.churn_files = churn_files
        self.run = Run()
        self.start = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start

    def request(self, rng: random.Random, tenant: int, steps: int | None = None) -> dict[str, Any]:
        names = self.adapters.get(tenant, [])
        stack = rng.sample(names, rng.randint(0, len(names))) if names else []
        adapters = [{"name": name, "scale": rng.choice((-1.0, 0.5, 0.8, 1.0)),
                     "start": rng.choice((0.0, 0.0, 0.5))} for name in stack]
        size = self.options.size
        return {"model": self.options.model, "prompt": rng.choice(PROMPTS), "seed": rng.randrange(1 << 31),
                "steps": steps or rng.choice(STEPS), "scheduler": rng.choice(SCHEDULERS), "guidance_scale": 7.5,
                "width": size, "height": size, "adapters": adapters}

    def record(self, kind: str, tenant: int, started: float, code: str, details: str = "") -> None:
        latency = time.perf_counter() - started
        self.run.calls.append(Call(kind, tenant, self.now(), latency, code, details[:200]))
        if code == "OK" and kind in GENERATION_KINDS:
            self.run.generations += 1

    async def one(self, stubs: Any, raw_generate: Any, rng: random.Random, worker: int) -> None:
        """One action of the mix (the churn action is three calls)."""
        import grpc

        from sdserve.api import convert

        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        tenant = rng.randrange(TENANTS)
        meta = self.metadata[tenant]
        calls: list[tuple[str, Any]] = []  # (kind, coroutine factory)
        if kind == "generate":
            request = convert.pb_from_dict(self.request(rng, tenant))
            calls.append((kind, lambda: stubs.generation.Generate(request, metadata=meta, timeout=60)))
        elif kind == "stream":
            request = convert.pb_from_dict(self.request(rng, tenant))
            calls.append((kind, lambda: _read_stream(stubs.generation.GenerateStream(request, metadata=meta,
                                                                                     timeout=60))))
        elif kind == "cancel":
            request = convert.pb_from_dict(self.request(rng, tenant, steps=30))
            calls.append((kind, lambda: _cancel_stream(stubs.generation.GenerateStream(request, metadata=meta,
                                                                                       timeout=60), 2)))
        elif kind == "deadline":
            request = convert.pb_from_dict(self.request(rng, tenant, steps=60))
            calls.append((kind, lambda: stubs.generation.Generate(request, metadata=meta, timeout=0.25)))
        elif kind == "bad_field":
            request = convert.pb_from_dict(_bad_fields(rng, self.options.model, self.options.size))
            calls.append((kind, lambda: stubs.generation.Generate(request, metadata=meta, timeout=30)))
        elif kind == "unknown_adapter":
            body = {**self.request(rng, tenant), "adapters": [{"name": f"nobody-{rng.randrange(10**6)}", "scale": 1.0}]}
            request = convert.pb_from_dict(body)
            calls.append((kind, lambda: stubs.generation.Generate(request, metadata=meta, timeout=30)))
        elif kind == "malformed":
            payload = rng.choice((b"\xff\xff\xff\xff", b"\x12\x02\xff\xfe", rng.randbytes(64)))
            calls.append((kind, lambda: raw_generate(payload, metadata=meta, timeout=30)))
        elif kind == "bad_key":
            request = convert.pb_from_dict(self.request(rng, tenant))
            bad = [("authorization", f"Bearer not-a-key-{rng.randrange(1000)}")]
            calls.append((kind, lambda: stubs.generation.Generate(request, metadata=bad, timeout=30)))
        elif kind == "bad_upload":
            junk = b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + rng.randbytes(4096)
            calls.append((kind, lambda: _upload(stubs, meta, "junk", junk)))
        elif kind == "churn":
            name, data = f"churn-w{worker}", rng.choice(self.churn_files)
            body = {**self.request(rng, tenant), "adapters": [{"name": name, "scale": 0.8}]}
            request = convert.pb_from_dict(body)
            delete = convert.request_message("DeleteAdapterRequest", name=name)
            calls += [("churn_upload", lambda: _upload(stubs, meta, name, data)),
                      ("churn_generate", lambda: stubs.generation.Generate(request, metadata=meta, timeout=60)),
                      ("churn_delete", lambda: stubs.adapters.DeleteAdapter(delete, metadata=meta, timeout=30))]
        else:
            listing = convert.request_message("ListAdaptersRequest")
            calls.append((kind, lambda: stubs.adapters.ListAdapters(listing, metadata=meta, timeout=30)))
        for call_kind, make in calls:
            started = time.perf_counter()
            try:
                outcome = await make()
                code = outcome if isinstance(outcome, str) else "OK"  # the stream readers' own verdict
                self.record(call_kind, tenant, started, code)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                self.record(call_kind, tenant, started, code, exc.details() or "")
            except Exception as exc:  # the client side broke: count it as unexpected, keep going
                code = f"CLIENT_{type(exc).__name__}"
                self.record(call_kind, tenant, started, code, str(exc))
            if call_kind == "churn_upload" and code != "OK":
                break  # nothing to use or delete

    async def sampler(self, stop_at: float) -> None:
        if self.pid is None:
            return
        import psutil

        process = psutil.Process(self.pid)
        while self.now() < stop_at:
            await asyncio.sleep(self.options.sample_seconds)
            self.sample(process)

    def sample(self, process: Any) -> None:
        import psutil

        try:
            with process.oneshot():
                rss, fds, threads = process.memory_info().rss, process.num_fds(), process.num_threads()
            children = process.children(recursive=True)
            children_rss = 0
            for child in children:
                with contextlib.suppress(psutil.Error):  # a validation worker that just ended
                    children_rss += child.memory_info().rss
        except psutil.Error:
            return  # the server is gone; the run reports it
        self.run.samples.append(Sample(round(self.now(), 2), rss, fds, threads, len(children), children_rss,
                                       len(self.run.calls), self.run.generations))

    async def drive(self) -> Run:
        import grpc
        import psutil
        from tqdm import tqdm

        from sdserve.api import convert

        options = self.options
        duration = 60.0 * options.minutes
        process = psutil.Process(self.pid) if self.pid is not None else None
        async with grpc.aio.insecure_channel(self.target,
                                             options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            stubs = convert.stubs(channel)
            raw_generate = channel.unary_unary(GENERATE_METHOD, request_serializer=None, response_deserializer=None)
            self.start = time.perf_counter()
            if process is not None:
                self.sample(process)  # before the load: the idle server with its adapters uploaded

            async def worker(index: int) -> None:
                rng = random.Random(options.seed * 1000 + index)
                while self.now() < duration and len(self.run.calls) < options.max_calls:
                    await self.one(stubs, raw_generate, rng, index)

            bar = tqdm(total=int(duration), desc="soak", unit="s", leave=False, mininterval=2.0,
                       disable=not sys.stderr.isatty())
            sampler = asyncio.ensure_future(self.sampler(duration + options.drain_seconds))
            workers = [asyncio.ensure_future(worker(i)) for i in range(options.concurrency)]
            while self.now() < duration and not all(w.done() for w in workers):
                await asyncio.sleep(1.0)
                bar.n = min(int(self.now()), int(duration))
                bar.set_postfix(calls=len(self.run.calls), refresh=True)
            bar.close()
            _, late = await asyncio.wait(workers, timeout=options.drain_seconds)
            for task in late:  # bounded: whatever is still open after the drain is cancelled
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            for task in workers:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            if process is not None:
                self.sample(process)  # after the load: everything answered
        return self.run


async def _read_stream(call: Any) -> str:
    """Read a GenerateStream to its end: "OK" with a result, "NO_RESULT" without one."""
    result = None
    async for event in call:
        if event.WhichOneof("event") == "result":
            result = event.result
    return "OK" if result is not None else "NO_RESULT"


async def _cancel_stream(call: Any, after_progress: int) -> str:
    """Cancel a GenerateStream once `after_progress` steps were reported (the client's cancel)."""
    seen = 0
    async for event in call:
        if event.WhichOneof("event") == "progress":
            seen += 1
            if seen >= after_progress:
                call.cancel()
                return "CANCELLED"
    return "OK"  # it finished first


async def _upload(stubs: Any, meta: list, name: str, data: bytes) -> Any:
    from sdserve.api import convert

    header = convert.UploadHeader(name=name, kind="lora", family="sd1", sha256=hashlib.sha256(data).hexdigest(),
                                  shared=False, size=len(data))
    return await stubs.adapters.UploadAdapter(convert.upload_chunks(header, data), metadata=meta, timeout=60)


# -- the report ----------------------------------------------------------------------------------


def summarize(run: Run, options: SoakOptions) -> dict[str, Any]:
    duration = 60.0 * options.minutes
    warmup = min(options.warmup_seconds, duration / 2)
    calls = run.calls
    codes = Counter(c.code for c in calls)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for c in calls:
        by_kind[c.kind][c.code] += 1
    surprises = [c for c in calls if unexpected(c.kind, c.code)]
    surprise_kinds = Counter((c.kind, c.code) for c in surprises)
    first_details: dict[tuple[str, str], str] = {}
    for c in surprises:
        first_details.setdefault((c.kind, c.code), c.details)

    # RSS per completed call, on the samples taken under load after the warm-up.
    steady = [s for s in run.samples if warmup <= s.t <= duration]
    fit = fit_line([s.calls for s in steady], [s.rss for s in steady])
    fit_generations = fit_line([s.generations for s in steady], [s.rss for s in steady])
    after_warmup = steady[0] if steady else None
    loaded = [s for s in run.samples if 0 <= s.t <= duration]
    end = loaded[-1] if loaded else None

    ok = [c for c in calls if c.kind in GENERATION_KINDS and c.code == "OK"]
    window = 60.0 if duration - warmup >= 120.0 else max((duration - warmup) / 2, 1.0)
    windows = latency_windows([c.ended for c in ok], [c.latency for c in ok], warmup, duration, window)

    def resources(sample: Sample | None) -> dict[str, Any] | None:
        return None if sample is None else {k: v for k, v in asdict(sample).items() if k not in ("calls", "generations")}

    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "warmup_seconds": warmup,
        "calls": len(calls),
        "calls_per_second": len(calls) / duration if duration else None,
        "generations_ok": len(ok),
        "codes": dict(codes),
        "codes_by_kind": {kind: dict(counter) for kind, counter in sorted(by_kind.items())},
        "unexpected": sum(surprise_kinds.values()),
        "unexpected_by_kind": [{"kind": k, "code": code, "count": n, "first_details": first_details[(k, code)]}
                               for (k, code), n in surprise_kinds.most_common()],
        "rss_fit": {"bytes_per_call": fit.slope, "stderr": fit.stderr, "points": fit.points,
                    "bytes_per_generation": fit_generations.slope, "stderr_generation": fit_generations.stderr,
                    "goal_bytes_per_call": 1024},
        "resources": {"before_load": resources(run.samples[0] if run.samples else None),
                      "after_warmup": resources(after_warmup), "end_of_load": resources(end),
                      "after_drain": resources(run.samples[-1] if run.samples else None),
                      "rss_max": max((s.rss for s in loaded), default=None),
                      "rss_min_after_warmup": min((s.rss for s in steady), default=None)},
        "latency_window_seconds": window,
        "latency_windows": windows,
        "p99_drift": p99_drift(windows),
        "p99_range": [min((w["p99"] for w in windows if w["p99"]), default=None),
                      max((w["p99"] for w in windows if w["p99"]), default=None)],
        "samples": [asdict(s) for s in run.samples],
        "records": [[c.kind, c.tenant, round(c.ended, 3), round(c.latency, 4), c.code] for c in calls],
    }


def print_report(summary: dict[str, Any]) -> None:
    from bench.common import print_table

    fit = summary["rss_fit"]
    res = summary["resources"]
    mib = 1024 * 1024

    def cell(sample: dict | None, key: str, scale: float = 1) -> str:
        return "-" if not sample else f"{sample[key] / scale:.1f}" if scale != 1 else str(sample[key])

    print_table(["", "before load", "after warm-up", "end of load", "after drain"],
                [[label, *(cell(res[k], key, scale) for k in ("before_load", "after_warmup", "end_of_load",
                                                               "after_drain"))]
                 for label, key, scale in (("RSS MiB", "rss", mib), ("open files", "fds", 1),
                                           ("threads", "threads", 1), ("child processes", "children", 1))])
    print()
    print(f"calls {summary['calls']} ({summary['calls_per_second']:.1f}/s), successful generations "
          f"{summary['generations_ok']}; RSS slope after warm-up {fit['bytes_per_call']:.1f} ± {fit['stderr']:.1f} "
          f"B/call ({fit['points']} samples; goal < 1024), {fit['bytes_per_generation']:.1f} B/generation")
    print()
    print_table(["window s", "generations", "p50 s", "p99 s"],
                [[f"{w['from_s']:.0f}-{w['to_s']:.0f}", w["count"], w["p50"] or math.nan, w["p99"] or math.nan]
                 for w in summary["latency_windows"]])
    drift = summary["p99_drift"]
    low, high = summary["p99_range"]
    spread = "-" if low is None else f"{low:.3f}-{high:.3f} s"
    print(f"p99 drift (last window / first after warm-up): {'-' if drift is None else f'{drift:.2f}'}; "
          f"p99 range over the windows {spread}")
    print()
    print_table(["kind", "codes"], [[kind, ", ".join(f"{code} {n}" for code, n in sorted(counter.items()))]
                                    for kind, counter in summary["codes_by_kind"].items()])
    print(f"unexpected: {summary['unexpected']}")
    for item in summary["unexpected_by_kind"]:
        print(f"  {item['kind']}: {item['code']} x{item['count']} ({item['first_details']})")


# -- the command line ------------------------------------------------------------------------------


def upload_tenant_adapters(target: str, keys: Sequence[str], files: list[bytes]) -> dict[int, list[str]]:
    """Each tenant uploads its own adapters (different files per tenant): tenant -> names."""
    from sdserve.client import Client

    names: dict[int, list[str]] = {}
    for tenant, key in enumerate(keys):
        with Client(target, api_key=key, timeout=120) as client:
            names[tenant] = []
            for j in range(ADAPTERS_PER_TENANT):
                name = f"soak-style-{tenant}-{j}"
                client.upload_adapter(files[tenant * ADAPTERS_PER_TENANT + j], name=name, family="sd1")
                names[tenant].append(name)
    return names


def delete_tenant_adapters(target: str, keys: Sequence[str], names: dict[int, list[str]], workers: int) -> None:
    import grpc

    from sdserve.client import Client

    for tenant, key in enumerate(keys):
        with Client(target, api_key=key, timeout=30) as client:
            for name in [*names.get(tenant, []), *(f"churn-w{i}" for i in range(workers))]:
                with contextlib.suppress(grpc.RpcError):  # never uploaded, or already gone
                    client.delete_adapter(name)


def run_soak(options: SoakOptions) -> dict[str, Any]:
    files = make_lora_files(options.model, TENANTS * ADAPTERS_PER_TENANT + 2, seed=options.seed + 100)
    churn_files = files[TENANTS * ADAPTERS_PER_TENANT:]
    server: dict[str, Any] = {"started_here": options.target is None}
    if options.target is not None:
        keys = list(options.keys)
        names = upload_tenant_adapters(options.target, keys, files)
        try:
            run = asyncio.run(Soak(options, options.target, keys, options.pid, names, churn_files).drive())
        finally:
            delete_tenant_adapters(options.target, keys, names, options.concurrency)
    else:
        keys = tenant_keys()
        results_root().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="soak-", dir=results_root()) as work, \
                launch_server(Path(work), options.model, keys) as (target, process):
            names = upload_tenant_adapters(target, keys, files)
            run = asyncio.run(Soak(options, target, keys, process.pid, names, churn_files).drive())
            process.send_signal(signal.SIGTERM)
            try:
                server["exit_code"] = process.wait(60)
            except subprocess.TimeoutExpired:
                server["exit_code"] = None  # launch_server kills it
            server["log_tail"] = (Path(work) / "server.log").read_text(errors="replace")[-4000:]
    summary = summarize(run, options)
    summary["server"] = server
    summary["workload"] = {
        "model": options.model, "size": f"{options.size}x{options.size}", "steps": STEPS, "schedulers": SCHEDULERS,
        "guidance": 7.5, "tenants": TENANTS, "adapters_per_tenant": ADAPTERS_PER_TENANT, "lora_ranks": LORA_RANKS,
        "lora_targets": "UNet to_q/to_k/to_v/to_out.0", "lora_file_bytes": sorted({len(f) for f in files}),
        "mix": MIX, "concurrency": options.concurrency,
    }
    return summary


def parse_args(argv: list[str] | None) -> SoakOptions:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakOptions()
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="load duration (30 for the long soak)")
    parser.add_argument("--warmup-minutes", type=float, help="default: 1, or a fifth of a shorter run")
    parser.add_argument("--target", help="a running server (loopback HOST:PORT) instead of starting one")
    parser.add_argument("--keys", help="with --target: three tenants' API keys, comma-separated")
    parser.add_argument("--pid", type=int, help="with --target: the server's pid, to sample it")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--size", type=int, default=defaults.size)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--sample-seconds", type=float, default=defaults.sample_seconds)
    parser.add_argument("--max-calls", type=int, default=defaults.max_calls)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, help="JSON output (default $SDSERVE_HOME/bench/soak.json "
                                                 "or /tmp/sdserve-bench/soak.json)")
    args = parser.parse_args(argv)
    keys = tuple(k for k in (args.keys or "").split(",") if k)
    if args.target:
        if not args.target.startswith(("127.0.0.1:", "localhost:", "[::1]:")):
            parser.error("--target must be a loopback HOST:PORT")
        if len(keys) != TENANTS:
            parser.error(f"--target needs --keys with {TENANTS} tenants' API keys")
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be in (0, 1440]")
    if not 1 <= args.concurrency <= 64:
        parser.error("--concurrency must be 1 to 64")
    return SoakOptions(minutes=args.minutes, warmup_minutes=args.warmup_minutes, target=args.target, keys=keys,
                       pid=args.pid, model=args.model, size=args.size, concurrency=args.concurrency,
                       sample_seconds=args.sample_seconds, max_calls=args.max_calls, seed=args.seed, out=args.out)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from bench.common import write_json

    options = parse_args(argv)
    summary = run_soak(options)
    print_report(summary)
    command = " ".join(["python -m bench.soak", *(sys.argv[1:] if argv is None else argv)])
    path = write_json("soak", {"command": command, **summary}, options.out or results_root() / "soak.json")
    print(f"wrote {path}")
    return 1 if summary["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())

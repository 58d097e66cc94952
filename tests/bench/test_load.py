"""Smoke tests of the load bench: workload shape, the homogeneous baseline's batching rule, a short
load against sdserve's server and against the diffusers baseline (in-process, loopback), compare."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.baselines.sdserve_server import HomogeneousBatcher, bench_config, build_engine
from bench.compare import compare
from bench.compare import main as compare_main
from bench.load_gen import Workload, drive, make_request, summarize, upload_adapters
from sdserve.engine.batcher import Batcher


def test_workload_stacks_zipf_and_tenants() -> None:
    import random

    workload = Workload(tenants=4, adapters=32)
    rng = random.Random(0)
    requests = [make_request(workload, rng) for _ in range(2000)]
    sizes = Counter(len(r["adapters"]) for _, r in requests)
    assert set(sizes) == {0, 1, 2, 3}
    uses = Counter(int(a["name"].split("-")[1]) for _, r in requests for a in r["adapters"])
    assert uses[0] > 3 * uses[20]  # Zipf: the most popular adapter far above a tail one
    for tenant, request in requests:  # a stack holds one tenant's adapters, each once
        owners = {int(a["name"].split("-")[1]) % 4 for a in request["adapters"]}
        assert owners <= {tenant}
        assert len({a["name"] for a in request["adapters"]}) == len(request["adapters"])
    again = [make_request(workload, random.Random(0)) for _ in range(1)]
    assert again[0] == requests[0]


def _state(arrival: int, stack: tuple) -> SimpleNamespace:
    entries = tuple(SimpleNamespace(source=s, scale=k, start=0.0, end=1.0) for s, k in stack)
    return SimpleNamespace(request=SimpleNamespace(adapters=entries), group_key=("m", 4, 4), rows=2,
                           last_tick=-1, arrival=arrival)


def test_homogeneous_batcher_batches_only_identical_stacks() -> None:
    stacks = [(("a", 1.0),), (("b", 1.0),), (("a", 1.0),), (("a", 0.5),), (), (("a", 1.0),)]
    mixed, homogeneous = Batcher(max_rows=32), HomogeneousBatcher(max_rows=32)
    for i, stack in enumerate(stacks):
        mixed.add(_state(i, stack))
        homogeneous.add(_state(i, stack))
    assert len(mixed.next_batch()[1]) == len(stacks)  # the production batcher mixes every stack
    seen = []
    for _ in range(4):  # every distinct stack gets its own turn, in least-recently-stepped order
        _, chosen = homogeneous.next_batch()
        keys = {tuple((e.source, e.scale) for e in s.request.adapters) for s in chosen}
        assert len(keys) == 1
        seen.append((keys.pop(), [s.arrival for s in chosen]))
    assert seen == [((("a", 1.0),), [0, 2, 5]), ((("b", 1.0),), [1]), ((("a", 0.5),), [3]), ((), [4])]


class LoopThread:
    """An asyncio loop on a thread, for in-process servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _short_load(target: str, tmp_path: Path) -> dict:
    workload = Workload(tenants=2, adapters=4, steps=(2, 3), seed=3)
    upload_adapters(target, workload.model, workload.adapters, workload.tenants, tmp_path / "adapters")
    records = asyncio.run(drive(target, workload, rate=20.0, duration=2.0, max_requests=10, timeout=30.0,
                                progress=False))
    summary = summarize(records, slo=30.0)
    assert summary["requests"] == 10 and summary["ok"] == 10, summary["errors"]
    assert all(r.first_progress is not None and r.first_progress <= r.latency for r in records)
    assert all(r.timings["denoise"] > 0 for r in records)
    assert any(r.stack > 0 for r in records)
    return summary


# The homogeneous batcher is unit-tested above; its end-to-end run (11 s) is slow.
@pytest.mark.parametrize("policy", ["mixed", pytest.param("homogeneous", marks=pytest.mark.slow)])
def test_load_against_sdserve(tmp_path: Path, policy: str) -> None:
    from sdserve.server.app import Server

    config = bench_config(tmp_path / "data", "tiny-sd1", tenants=2)
    server = Server(config, engine=build_engine(config, policy))
    loop = LoopThread()
    try:
        loop.call(server.start())
        summary = _short_load(f"127.0.0.1:{server.port}", tmp_path)
        assert summary["throughput_rps"] > 0
    finally:
        loop.call(server.stop(), timeout=30)
        loop.close()


def test_load_against_diffusers_baseline(tmp_path: Path) -> None:
    from bench.baselines.diffusers_server import start

    loop = LoopThread()
    server, port = loop.call(start(0, tmp_path / "data", "tiny-sd1", cache=2))
    try:
        summary = _short_load(f"127.0.0.1:{port}", tmp_path)  # 4 adapters through a cache of 2: evictions
        assert summary["mean_phase_seconds"]["adapter_load"] > 0
    finally:
        loop.call(server.stop(grace=1.0), timeout=30)
        loop.close()


def test_compare_ratios(tmp_path: Path, capsys) -> None:
    def suite(throughput: float, p99: float) -> dict:
        summary = {"throughput_rps": throughput, "latency_p50": 1.0, "latency_p99": p99,
                   "first_progress_p50": 0.1, "slo_attainment": 1.0}
        return {"runs": [{"system": "sdserve", "adapters": 32, "load": "6/s", "summary": summary}]}

    (row,) = compare(suite(2.0, 4.0), suite(6.0, 1.0))
    assert row[:3] == ["sdserve", 32, "6/s"]
    assert row[3] == pytest.approx(3.0) and row[5] == pytest.approx(0.25)  # B/A: throughput 3x, p99 a quarter
    (tmp_path / "a.json").write_text(json.dumps(suite(2.0, 4.0)))
    (tmp_path / "b.json").write_text(json.dumps(suite(6.0, 1.0)))
    assert compare_main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0

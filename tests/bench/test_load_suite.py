"""bench/load_suite.py's offered loads from measured capacity: the closed-loop capacity point runs first
at each adapter count and a suite's fractional loads are that fraction of sdserve's throughput there,
shown with it in the tables and the JSON. Servers and the load generator are replaced by fakes."""

from __future__ import annotations

import contextlib
import json

import bench.load_suite as suite
from bench.load_gen import Record, summarize

# Closed-loop throughput each fake system "reaches" (req/s), per adapter count.
CAPACITY = {("sdserve", 8): 9.5, ("sdserve", 32): 6.25, ("diffusers", 8): 2.0, ("diffusers", 32): 1.5,
            ("homogeneous", 8): 4.0, ("homogeneous", 32): 3.0}


def _fake(monkeypatch) -> list[dict]:
    calls: list[dict] = []

    @contextlib.contextmanager
    def launch(system, tmp, model, tenants, log_dir=None):
        yield system

    async def drive(*args, **kwargs):
        return []

    def run_one(target, workload, *, rate, concurrency, duration, max_requests, timeout, slo, label=""):
        calls.append({"system": target, "adapters": workload.adapters, "rate": rate, "concurrency": concurrency,
                      "duration": duration})
        records = [Record(i, 0, 0, 2, 0.1 * i, status="OK", latency=1.0,
                          timings={"queue": 0.0, "adapter_load": 0.0, "denoise": 0.5, "decode": 0.1}) for i in range(3)]
        summary = summarize(records, slo)
        # Closed loop: the system's capacity; open loop: it serves what is offered.
        summary["throughput_rps"] = CAPACITY[target, workload.adapters] if concurrency else rate
        return {"rate": rate, "concurrency": concurrency, "summary": summary, "records": []}

    monkeypatch.setattr(suite, "launch", launch)
    monkeypatch.setattr(suite, "upload_adapters", lambda *args, **kwargs: None)
    monkeypatch.setattr(suite, "drive", drive)
    monkeypatch.setattr(suite, "run_one", run_one)
    monkeypatch.setattr(suite, "plots", lambda *args, **kwargs: [])
    return calls


def test_fractional_loads_follow_sdserve_measured_capacity(monkeypatch, tmp_path, capsys):
    calls = _fake(monkeypatch)
    monkeypatch.setitem(suite.SUITES, "two", {"adapters": (8, 32), "rates": (2.0,), "fractions": (0.8,),
                                              "capacity": 16, "duration": 20.0, "warmup": 1.0, "timeout": 20.0})
    assert suite.run_suite("two", tmp_path / "load.json", duration=3.0) == 0
    for adapters in (8, 32):
        mine = [c for c in calls if c["adapters"] == adapters]
        # Capacity first (every system), then the fixed rate, then the fraction of sdserve's capacity.
        assert [c["concurrency"] for c in mine[:3]] == [16] * 3
        assert [c["rate"] for c in mine[3:6]] == [2.0] * 3
        assert [c["rate"] for c in mine[6:]] == [round(0.8 * CAPACITY["sdserve", adapters], 2)] * 3
    assert all(c["duration"] == 3.0 for c in calls)  # --duration replaces the suite's 20 s
    payload = json.loads((tmp_path / "load.json").read_text())
    assert payload["capacity_of"] == "sdserve" and payload["capacity_rps"] == {"8": 9.5, "32": 6.25}
    assert payload["command"] == "python -m bench.load --suite two --duration 3"
    fractional = [r for r in payload["runs"] if r["fraction"] is not None]
    assert {r["load"] for r in fractional} == {"0.8x cap"}  # stable label: bench.compare matches on it
    table = (tmp_path / "load.md").read_text()
    assert "sdserve closed-loop capacity at 32 adapters (closed 16): 6.25 req/s" in table
    assert "| 32 | 0.8x cap = 5/s | sdserve |" in table and "| 8 | 0.8x cap = 7.6/s |" in table


def test_without_sdserve_the_first_system_sets_capacity_and_zero_capacity_skips(monkeypatch, tmp_path, capsys):
    calls = _fake(monkeypatch)
    monkeypatch.setitem(CAPACITY, ("diffusers", 32), 0.0)
    assert suite.run_suite("goal", tmp_path / "load.json", systems=("diffusers", "homogeneous")) == 0
    assert [c["concurrency"] for c in calls] == [16, 16]  # capacity only: the fractional run was skipped
    assert "skipped 0.8x cap at 32 adapters: diffusers served nothing" in capsys.readouterr().out

"""Health checks and refusals stay fast while one UNet call takes seconds (server in its own
process, client here): the engine thread runs apart from the event loop and torch releases the
GIL inside its ops. Slow: a 256x256 step of the tiny model takes ~4 s on one CPU thread."""

from __future__ import annotations

import statistics
import time

import grpc
import pytest

from sdserve.client import Client
from tests.server.conftest import start_subprocess_server

CONFIG = """
[server]
port = @PORT@

[models]
serve = ["tiny-sd1"]

[registry]
data_dir = "@DATA@"

[admission]
max_pending_cost = 1000000
max_tenant_pending_cost = 1000000
max_inflight_cost = 1000000
"""

BUSY = {"prompt": "a house", "width": 256, "height": 256, "steps": 3, "seed": 1}  # cost 393 216
EXCESS = {"prompt": "a house", "width": 256, "height": 256, "steps": 5, "seed": 2}  # 655 360: fits alone, not now


def _latencies(call, count: int) -> list[float]:
    out = []
    for _ in range(count):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


@pytest.mark.slow
def test_health_and_refusals_while_a_long_step_runs(tmp_path):
    process, port, _log = start_subprocess_server(tmp_path, CONFIG)
    client = Client(f"127.0.0.1:{port}")
    try:
        busy = client.generate_future(BUSY, timeout=120)
        time.sleep(1.0)  # inside the first UNet call by now
        health = _latencies(lambda: client.health() == "SERVING" or pytest.fail("not serving"), 30)
        second = client.generate_future({**BUSY, "seed": 3}, timeout=120)  # pending now 786 432

        def refused() -> None:
            with pytest.raises(grpc.RpcError) as info:
                client.generate(EXCESS, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        refusals = _latencies(refused, 30)
        assert not busy.done(), "the engine was not busy during the measurement"
        busy.result()
        second.result()
    finally:
        client.close()
        process.terminate()
        process.wait(30)
    for name, values in (("health", health), ("refusal", refusals)):
        print(f"{name} while busy: median {statistics.median(values) * 1e3:.1f} ms, max {max(values) * 1e3:.1f} ms")
    assert statistics.median(health) < 0.02 and max(refusals) < 0.1

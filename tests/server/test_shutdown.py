"""SIGTERM drains a real `sdserve serve` process: running requests finish, new calls are
UNAVAILABLE, health turns NOT_SERVING, and the process exits cleanly."""

from __future__ import annotations

import signal
import threading
import time

import grpc

from sdserve.client import Client
from tests.server.conftest import start_subprocess_server

CONFIG = """
[server]
host = "127.0.0.1"
port = @PORT@
grace_seconds = 30.0

[models]
serve = ["tiny-sd1"]

[registry]
data_dir = "@DATA@"
"""


def test_sigterm_drains(tmp_path):
    process, port, log = start_subprocess_server(tmp_path, CONFIG)
    try:
        first_lines = log.read_text().splitlines()[:3]
        assert any("one tenant 'local' with no API key" in line for line in first_lines), first_lines
        client = Client(f"127.0.0.1:{port}")
        request = {"model": "tiny-sd1", "prompt": "a red circle", "steps": 60}
        results: dict[int, object] = {}
        started = threading.Barrier(3)

        def run(index: int) -> None:
            events = iter(client.generate_stream({**request, "seed": index}, timeout=120))
            next(events)  # queued
            next(events)  # stepping
            started.wait()
            try:
                results[index] = [e for e in events][-1].result
            except grpc.RpcError as exc:
                results[index] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        started.wait(60)
        process.send_signal(signal.SIGTERM)
        t = time.monotonic()
        while client.health() != "NOT_SERVING":
            assert time.monotonic() - t < 2, "health did not turn NOT_SERVING"
            time.sleep(0.01)
        try:
            client.generate({**request, "steps": 2}, timeout=10)
            raise AssertionError("a new call was accepted while draining")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
        for thread in threads:
            thread.join(60)
        for index in range(2):
            result = results[index]
            assert not isinstance(result, Exception), result
            assert len(result.images) == 1 and result.seed == index
        assert process.wait(30) == 0
        assert "stopped" in log.read_text()
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

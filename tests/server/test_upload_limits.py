"""Hostile uploads cost bounded time, memory and GIL; uploads under way are bounded.

The pool tests run stdlib and torch callables in validation workers (a catastrophic regex holds
the GIL in C, as a hostile file's metadata did; torch.empty and bytearray are memory bombs;
os._exit and os.abort crash). The server tests make `load_lora` itself hostile: the servicer
sends the function it names to the worker, so the replacement below runs there (and, in a server
without workers, in the server process, holding its GIL).

This module is imported by validation workers (they run `hold_gil_lora`): keep its top-level
imports light; the server fixtures import the server inside functions.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from sdserve.errors import AdapterError, InvalidArgument

HOLD_PIECES, PIECE_SECONDS = 4, 2  # hold_gil_lora holds the GIL 4 x 2 s; the server's limit is 5 s
CATASTROPHIC = (r"(a+)+b", "a" * 40)  # ~2^40 backtracking steps in C, GIL held throughout


def marker_path(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"sdserve-test-{name}.validating"


def hold_gil_lora(source: Any, name: str, targets: Any, **_: Any) -> None:
    """A stand-in for `load_lora` whose validation holds the GIL in C for 8 s.

    It holds it in 2 s pieces with a moment between them, so that a server running it in its own
    process crawls (each of a call's GIL hand-offs waits up to 2 s) rather than stops outright,
    and the test's own thread gets to see the marker file that says validation has started."""
    marker_path(name).touch()
    libc = ctypes.PyDLL(None)  # a PyDLL call keeps the GIL, as C parsers and the re engine do
    for _ in range(HOLD_PIECES):
        libc.sleep(PIECE_SECONDS)
        time.sleep(0.001)


def _config(**registry: Any) -> Any:
    from sdserve.server.config import RegistryConfig

    return RegistryConfig(**registry)


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _outcome(pool: Any, fn: Any, *args: Any, **kwargs: Any) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await pool.run(fn, *args, **kwargs)
    except Exception as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def _gone(pid: int) -> bool:
    """Not running (reaped, or a zombie waiting for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


# -- (a) the pool itself ----------------------------------------------------------------------------


def test_adapter_errors_cross_as_their_message(tmp_path):
    from sdserve.adapters import load_lora
    from sdserve.server.upload_check import UploadChecks

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(AdapterError) as in_process:
        load_lora(bad, "bad", {})

    async def main() -> None:
        pool = UploadChecks(_config(max_concurrent_uploads=1)).start()
        try:
            with pytest.raises(AdapterError) as in_worker:
                await pool.run(load_lora, bad, "bad", {})
            assert in_worker.value.message == in_process.value.message
            assert in_worker.value.__cause__ is None and in_worker.value.__context__ is None
            await pool.run(len, "fine")  # a worker survives a refused file
            (report,) = pool.worker_reports
            print("worker start-up:", report)
            assert report["memory_limited"] and report["vm_bytes"] > report["rss_bytes"] > 0
        finally:
            pool.close()

    _run(main())


def test_only_a_small_json_report_comes_back(tmp_path):
    import safetensors.torch
    import torch

    from sdserve.adapters.inspect import listing
    from sdserve.server.upload_check import UploadChecks

    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(safetensors.torch.save({"lora_unet_x.lora_down.weight": torch.ones(3, 8),
                                             "lora_unet_x.lora_up.weight": torch.ones(8, 3)}))

    async def main() -> None:
        pool = UploadChecks(_config(max_concurrent_uploads=1)).start()
        try:
            assert await pool.run(listing, lora, "lora", "lora") == {"form": "lora", "rank": 3, "targets": 1,
                                                                       "slider_scales": "", "slider_start": 0.0}
            assert await pool.run(dict, form="lora", rank=2) == {"form": "lora", "rank": 2}
            assert await pool.run(len, "fine") is None  # not a report
            assert await pool.run(dict, tensor=[1, 2]) is None  # not scalars: stays in the worker
            assert await pool.run(dict, [(str(i), i) for i in range(17)]) is None  # too many entries
        finally:
            pool.close()

    _run(main())


def test_slow_job_is_killed_at_the_limit_and_the_loop_keeps_running():
    from sdserve.server.upload_check import UploadChecks

    async def main() -> None:
        pool = UploadChecks(_config(validate_timeout_seconds=1.0, max_concurrent_uploads=1)).start()
        try:
            await pool.run(len, "warm")  # start-up is not part of what is timed below
            (first,) = pool.worker_pids
            gaps: list[float] = []
            stop = asyncio.Event()

            async def ticker() -> None:
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    gaps.append(time.monotonic() - last)
                    last = time.monotonic()

            tick = asyncio.create_task(ticker())
            elapsed, error = await _outcome(pool, re.fullmatch, *CATASTROPHIC)
            stop.set()
            await tick
            assert isinstance(error, InvalidArgument) and error.field == "data", error
            assert "longer than the server's limit of 1 s" in error.message
            assert 1.0 <= elapsed < 2.5, elapsed
            assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps):.2f} s"
            assert _gone(first), "the timed-out worker still runs"
            elapsed, error = await _outcome(pool, len, "next")
            assert error is None and first not in pool.worker_pids
            # A cancelled job (its client went away) stops its worker at once, not at the limit.
            (second,) = pool.worker_pids
            job = asyncio.create_task(pool.run(re.fullmatch, *CATASTROPHIC))
            await asyncio.sleep(0.2)
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job
            assert _gone(second) and second not in pool.worker_pids
            assert (await _outcome(pool, len, "after"))[1] is None
        finally:
            pool.close()

    _run(main())


def test_memory_bombs_are_refused_by_the_address_space_limit():
    import torch

    from sdserve.server.upload_check import UploadChecks

    limit = 256 * 1024 * 1024

    async def main() -> None:
        pool = UploadChecks(_config(validate_memory_bytes=limit, max_concurrent_uploads=1)).start()
        try:
            # Within the limit: 64 MiB (torch, as the reader allocates) works.
            assert (await _outcome(pool, torch.empty, limit // 4, dtype=torch.uint8))[1] is None
            for bomb, args in ((torch.empty, (4 * limit,)), (bytearray, (4 * limit,))):
                kwargs = {"dtype": torch.uint8} if bomb is torch.empty else {}
                _, error = await _outcome(pool, bomb, *args, **kwargs)
                assert isinstance(error, InvalidArgument) and error.field == "data", (bomb, error)
                assert "more memory than the server's limit" in error.message
            assert (await _outcome(pool, len, "next"))[1] is None
        finally:
            pool.close()

    _run(main())


def test_a_crashing_worker_is_replaced():
    from sdserve.server.upload_check import UploadChecks

    async def main() -> None:
        pool = UploadChecks(_config(max_concurrent_uploads=1)).start()
        try:
            for crash, args in ((os._exit, (3,)), (os.abort, ())):
                await pool.run(len, "warm")
                (before,) = pool.worker_pids
                _, error = await _outcome(pool, crash, *args)
                assert isinstance(error, InvalidArgument) and error.field == "data", error
                # Says the file was refused, and nothing about the worker (exit code, pid, signal).
                assert error.message == "the file could not be validated (its validation failed)"
                assert _gone(before)
                assert (await _outcome(pool, len, "next"))[1] is None
                assert before not in pool.worker_pids
        finally:
            pool.close()

    _run(main())


def test_workers_die_with_their_server(tmp_path):
    """SIGKILL the process that owns a pool while one worker is stuck in C with the GIL held and
    one is idle: both die (PR_SET_PDEATHSIG), nothing waits for a job that never comes."""
    script = f"""
import asyncio, json, re, types
from sdserve.server.upload_check import UploadChecks

async def main():
    # The RegistryConfig fields the pool reads (config.py would import the engine: seconds).
    config = types.SimpleNamespace(max_concurrent_uploads=2, validate_timeout_seconds=120, validate_memory_bytes=1 << 32)
    pool = UploadChecks(config).start()
    await pool.run(len, "warm")
    asyncio.ensure_future(pool.run(re.fullmatch, {CATASTROPHIC!r}[0], {CATASTROPHIC!r}[1]))
    await asyncio.sleep(0.3)
    print(json.dumps(pool.worker_pids), flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(owner.stdout.readline())
        assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(_gone(pid) for pid in pids):
        time.sleep(0.05)
    assert all(_gone(pid) for pid in pids), "a validation worker outlived its server"


# -- (b), (c) the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory):
    from dataclasses import replace

    from tests.server.conftest import ServerThread, make_config

    config = make_config(tmp_path_factory.mktemp("upload-limits"))
    config = replace(
        config,
        registry=replace(
            config.registry, validate_timeout_seconds=5.0, max_concurrent_uploads=3, max_tenant_concurrent_uploads=2
        ),
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def _header(data: bytes, name: str) -> Any:
    from sdserve.api import convert
    from tests.server.conftest import sha

    return convert.UploadHeader(name, "lora", "sd1", sha(data), False, len(data))


def _timed(call: Any) -> tuple[float, Any]:
    started = time.monotonic()
    result = call()
    return time.monotonic() - started, result


def test_a_slow_validation_does_not_stall_the_server(limits_server, lora_bytes, monkeypatch):
    import sdserve.server.adapters_service as adapters_service

    request = {"model": "tiny-sd1", "prompt": "a red circle", "seed": 3, "steps": 2}
    bob = limits_server.client("bob")
    baseline, _ = _timed(lambda: bob.generate(request, timeout=60))  # warm, and what it costs idle
    monkeypatch.setattr(adapters_service, "load_lora", hold_gil_lora)
    name = f"slow-{uuid.uuid4().hex[:8]}"
    marker_path(name).unlink(missing_ok=True)
    result: dict[str, Any] = {}

    def upload() -> None:
        try:
            result["info"] = limits_server.client("alice").upload_adapter(lora_bytes["sd1_a"], name=name, family="sd1")
        except grpc.RpcError as exc:
            result["error"] = exc

    uploading = threading.Thread(target=upload)
    uploading.start()
    try:
        deadline = time.monotonic() + 60
        while not marker_path(name).exists():
            assert time.monotonic() < deadline and uploading.is_alive(), f"validation never started: {result}"
            time.sleep(0.01)
        # alice's file is being validated now (for longer than the server allows).
        times = {
            "health": _timed(lambda: bob.health(timeout=10))[0],
            "ListModels": _timed(bob.list_models)[0],
            "Generate": _timed(lambda: bob.generate(request, timeout=60))[0],
        }
        print(f"while validating: {times}, Generate idle {baseline:.2f} s")
        assert times["health"] < 1.0 and times["ListModels"] < 1.0, times
        assert times["Generate"] < baseline + 1.0, times
        assert uploading.is_alive(), "the validation ended before the checks: they proved nothing"
    finally:
        uploading.join(60)
        marker_path(name).unlink(missing_ok=True)
    error = result.get("error")
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, result
    assert error.details() == "data: validating the file took longer than the server's limit of 5 s"
    assert name not in [a.name for a in limits_server.client("alice").list_adapters().adapters]


class SlowUpload:
    """An upload whose client sends the header and a first piece, then waits to be released."""

    def __init__(self, server: Any, tenant: str, data: bytes, name: str, timeout: float = 60) -> None:
        from sdserve.api import convert

        self.release = threading.Event()
        self.result: dict[str, Any] = {}

        def pieces() -> Any:
            yield data[:100]
            self.release.wait(60)
            yield data[100:]

        def run() -> None:
            try:
                chunks = convert.upload_chunks(_header(data, name), pieces())
                self.result["info"] = server.client(tenant).upload_chunks(chunks, timeout=timeout)
            except grpc.RpcError as exc:
                self.result["error"] = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def finish(self) -> Any:
        self.release.set()
        self.thread.join(60)
        assert "info" in self.result, self.result
        return self.result["info"]


def _wait_receiving(server: Any, count: int) -> None:
    """Until `count` uploads are receiving bytes (each has a staged file)."""
    deadline = time.monotonic() + 30
    while len(list(server.core.registry.tmp.iterdir())) < count:
        assert time.monotonic() < deadline, "the slow uploads did not start"
        time.sleep(0.01)


def _refused_at_once(call: Any, needle: str) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        call()
    elapsed = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert needle in info.value.details(), info.value.details()
    assert elapsed < 1.0, f"refused after {elapsed:.2f} s"


def test_uploads_under_way_are_bounded_per_tenant(limits_server, lora_bytes):
    data = lora_bytes["sd1_b"]
    alice, bob = limits_server.client("alice"), limits_server.client("bob")
    slow = [SlowUpload(limits_server, "alice", data, f"held-{i}") for i in range(2)]
    try:
        _wait_receiving(limits_server, 2)
        _refused_at_once(lambda: alice.upload_adapter(data, name="third", family="sd1"), "this tenant already has 2")
        assert bob.upload_adapter(data, name="bobs", family="sd1").name == "bobs"  # others are not held up
    finally:
        infos = [upload.finish() for upload in slow]
    assert [info.name for info in infos] == ["held-0", "held-1"]
    assert alice.upload_adapter(data, name="third", family="sd1").name == "third"

    # An upload that ends badly (the client's deadline passes mid-stream) gives its place back.
    held = SlowUpload(limits_server, "alice", data, "held-again")
    gave_up = SlowUpload(limits_server, "alice", data, "gave-up", timeout=3.0)
    try:
        _wait_receiving(limits_server, 2)
        _refused_at_once(lambda: alice.upload_adapter(data, name="after-deadline", family="sd1"), "already has 2")
        gave_up.thread.join(30)
        assert gave_up.result["error"].code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 3  # the server hears of the cancellation a moment later
        while True:
            try:
                alice.upload_adapter(data, name="after-deadline", family="sd1")
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, exc
                time.sleep(0.05)
    finally:
        held.finish()
    names = {a.name for a in alice.list_adapters().adapters}
    assert {"held-0", "held-1", "third", "held-again", "after-deadline"} <= names and "gave-up" not in names


def test_uploads_under_way_are_bounded_in_total(limits_server, lora_bytes):
    data = lora_bytes["sd1_c"]
    admin = limits_server.client("admin")
    slow = [SlowUpload(limits_server, tenant, data, f"total-{i}") for i, tenant in enumerate(("alice", "alice", "bob"))]
    try:
        _wait_receiving(limits_server, 3)
        # admin has none under way, but the server has its 3.
        _refused_at_once(lambda: admin.upload_adapter(data, name="fourth", family="sd1"), "as many uploads as it may")
    finally:
        for upload in slow:
            upload.finish()
    assert admin.upload_adapter(data, name="fourth", family="sd1").name == "fourth"

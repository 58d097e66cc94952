"""Faults (hardening item 8): the store, the disk, one request's model call, the engine thread.

Each test breaks one thing under a live server and checks the three promises that matter to
tenants: the failing call gets a typed error that leaks nothing, other calls keep their results,
and the server is usable again (or, for the engine thread, says it is not and exits non-zero).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from sdserve.api.convert import spec_from_dict
from sdserve.client import Client
from sdserve.errors import Internal
from sdserve.server.config import AdmissionConfig
from tests.server.conftest import (
    MODEL,
    ServerThread,
    free_port,
    make_config,
    max_diff,
    png_pixels,
    reference_images,
    sha,
    subprocess_env,
    wait_for,
)

SMALL = {"model": MODEL, "prompt": "a red circle", "steps": 2}  # 32x32 with CFG: 2 rows
SMALL_COST = 32 * 32 * 2 * 2
POISON = "a poisoned lighthouse"  # the prompt of the request whose model call raises


def _rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _leaks_no_path(details: str, *private: str) -> None:
    assert "/" not in details and "\\" not in details, f"a path leaked: {details}"
    for secret in private:
        assert secret not in details, f"{secret!r} leaked: {details}"


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(data_dir: Path | None = None, **sections: Any) -> ServerThread:
        thread = ServerThread(make_config(data_dir or tmp_path / f"data{len(servers)}", **sections)).start()
        servers.append(thread)
        return thread

    yield start
    for thread in servers:
        thread.stop()


# -- (a) an adapter file removed or truncated in the store between upload and use -----------------


def _with(name: str, **extra: Any) -> dict[str, Any]:
    return {**SMALL, "seed": 3, "adapters": [{"name": name, "scale": 1.0}], **extra}


# Registry.register keeps a stored file whose name is the upload's digest without reading it
# ("same bytes already stored"), so a file truncated in place survives every re-upload.
@pytest.mark.parametrize("damage", ["removed", "truncated"])
def test_a_damaged_store_file_fails_its_calls_alone_and_a_reupload_repairs_it(fresh_server, lora_bytes, damage):
    server = fresh_server()
    data = lora_bytes["sd1_a"]
    blob = server.core.registry.blob_path(sha(data))
    with server.client("alice") as alice, server.client("bob") as bob:
        alice.upload_adapter(data, name="style", family="sd1")
        bob.upload_adapter(lora_bytes["sd1_b"], name="bobs", family="sd1")
        if damage == "removed":
            blob.unlink()
        else:
            blob.write_bytes(data[: len(data) // 2])
        # The engine never loaded these bytes, so it must read the damaged file: a typed error
        # about the data, naming the adapter as the caller named it, and no path.
        error = _rpc_error(lambda: alice.generate(_with("style"), timeout=60))
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), error.details()
        assert "'style'" in error.details(), error.details()
        _leaks_no_path(error.details(), sha(data))
        # Everyone else is served as before, the same tenant included.
        assert bob.generate(_with("bobs"), timeout=60).images
        assert alice.generate({**SMALL, "seed": 4}, timeout=60).images
        # The same bytes uploaded again under the same name make the name work again.
        alice.upload_adapter(data, name="style", family="sd1")
        assert blob.read_bytes() == data, "the re-upload left the damaged file in the store"
        response = alice.generate(_with("style"), timeout=60)
        assert response.images and response.adapters[0].sha256 == sha(data)


# slow: the [truncated] case of the test above, plus a second failing attempt (6 s)
@pytest.mark.slow
def test_a_truncated_store_file_fails_its_calls_alone(fresh_server, lora_bytes):
    """The truncated case of the test above, up to the re-upload (which that test marks)."""
    server = fresh_server()
    data = lora_bytes["sd1_a"]
    with server.client("alice") as alice, server.client("bob") as bob:
        alice.upload_adapter(data, name="style", family="sd1")
        bob.upload_adapter(lora_bytes["sd1_b"], name="bobs", family="sd1")
        server.core.registry.blob_path(sha(data)).write_bytes(data[: len(data) // 2])
        for _ in range(2):  # the failure is the attempt's, and the next attempt meets the file again
            error = _rpc_error(lambda: alice.generate(_with("style"), timeout=60))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert "'style'" in error.details(), error.details()
            _leaks_no_path(error.details(), sha(data))
        assert bob.generate(_with("bobs"), timeout=60).images
        assert alice.generate({**SMALL, "seed": 4}, timeout=60).images


def test_a_store_file_damaged_after_use_is_served_from_memory(fresh_server, lora_bytes):
    server = fresh_server()
    data = lora_bytes["sd1_c"]
    with server.client("alice") as alice:
        alice.upload_adapter(data, name="style", family="sd1")
        before = alice.generate(_with("style"), timeout=60)
        server.core.registry.blob_path(sha(data)).write_bytes(data[:100])
        # The engine holds the adapter by digest (host and slot tiers): it never rereads the
        # file, and the bytes it holds are the ones that were uploaded and checked.
        after = alice.generate(_with("style"), timeout=60)
    assert max_diff(png_pixels(after.images[0].png), png_pixels(before.images[0].png)) == 0


# -- (b) the disk fills up while an upload is received ------------------------------------------


@contextmanager
def _full_after(registry: Any, limit: int) -> Iterator[list[int]]:
    """Staging files of `registry` take `limit` bytes, then every write fails with ENOSPC (the
    bytes up to the limit are written for real, so a partial file exists when it fails)."""
    original = registry.staging_file
    failures: list[int] = []

    class FullDisk:
        def __init__(self, handle: Any) -> None:
            self.handle, self.written = handle, 0

        def write(self, data: bytes) -> int:
            room = limit - self.written
            if len(data) > room:
                self.handle.write(data[: max(room, 0)])
                self.handle.flush()
                self.written = limit
                failures.append(len(data))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.handle.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

    @contextmanager
    def staging_file() -> Iterator[tuple[Path, Any]]:
        with original() as (path, handle):
            yield path, FullDisk(handle)

    registry.staging_file = staging_file
    try:
        yield failures
    finally:
        del registry.staging_file  # the class's method again


def _assert_failed_upload_left_nothing(server: ServerThread, before: list[Path], error: grpc.RpcError) -> None:
    print(f"upload on a full disk: {error.code().name}: {error.details()}")
    # ENOSPC is the server's condition, not the caller's fault and not a bug: retry later.
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "out of disk space" in error.details()
    registry = server.core.registry
    _leaks_no_path(error.details(), str(registry.root), "upload-", ".part")
    assert registry.files() == before, "a failed upload left a file in the store or the staging area"
    assert not list(registry.tmp.iterdir())
    assert [r.name for r in registry.list("alice")] == ["kept"]


def test_disk_full_during_upload_write_leaves_nothing_and_the_next_upload_works(fresh_server, lora_bytes):
    server = fresh_server()
    registry = server.core.registry
    with server.client("alice") as alice:
        alice.upload_adapter(lora_bytes["sd1_a"], name="kept", family="sd1")
        before = registry.files()
        data = lora_bytes["sd1_b"]
        with _full_after(registry, len(data) // 3) as failures:
            error = _rpc_error(lambda: alice.upload_adapter(data, name="new", family="sd1", timeout=60))
        assert failures, "the upload never reached the full disk"
        _assert_failed_upload_left_nothing(server, before, error)
        info = alice.upload_adapter(data, name="new", family="sd1", timeout=60)
        assert registry.blob_path(info.sha256).read_bytes() == data
        assert alice.generate(_with("new"), timeout=60).images


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_a_really_full_disk_fails_the_upload_cleanly_and_space_brings_uploads_back(small_tmpfs, lora_bytes):
    server = ServerThread(make_config(small_tmpfs / "data")).start()
    try:
        registry = server.core.registry
        with server.client("alice") as alice:
            alice.upload_adapter(lora_bytes["sd1_a"], name="kept", family="sd1")
            before = registry.files()
            data = lora_bytes["sd1_b"]
            # Fill the file system but a little less than the upload needs.
            filler = small_tmpfs / "filler"
            stats = os.statvfs(small_tmpfs)
            free = stats.f_bavail * stats.f_frsize
            with filler.open("wb") as handle:
                handle.write(b"\0" * max(free - len(data) // 3, 0))
            error = _rpc_error(lambda: alice.upload_adapter(data, name="new", family="sd1", timeout=60))
            _assert_failed_upload_left_nothing(server, before, error)
            filler.unlink()
            info = alice.upload_adapter(data, name="new", family="sd1", timeout=60)
            assert registry.blob_path(info.sha256).read_bytes() == data
            assert alice.generate(_with("new"), timeout=60).images
    finally:
        server.stop()


# -- (c) one request's model call raises: its batch-mates finish with their own images ------------


GOOD = ({**SMALL, "prompt": "a blue square", "seed": 1, "steps": 4, "scheduler": "euler"},
        {**SMALL, "prompt": "a cat in a hat", "seed": 2, "steps": 3, "scheduler": "ddim"})
BAD = {**SMALL, "prompt": POISON, "seed": 9, "steps": 4}


def _poisoning(backend: Any, where: str, batches: list[list[str]]) -> Callable[..., Any]:
    """A `predict_noise` that raises for batches holding the poisoned request (`where` = "unet"),
    or makes that request's own scheduler step raise (`where` = "scheduler")."""
    original = backend.predict_noise

    def predict_noise(model: Any, batch: Any) -> Any:
        prompts = [entry.state.request.prompt for entry in batch.entries]
        batches.append(prompts)
        if POISON in prompts:
            if where == "unet":
                raise RuntimeError("injected fault in the UNet call")
            for entry in batch.entries:
                if entry.state.request.prompt == POISON:
                    entry.state.scheduler.step = _raise_in_scheduler
        return original(model, batch)

    return predict_noise


def _raise_in_scheduler(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected fault in the scheduler step")


@pytest.mark.parametrize("where", ["unet", "scheduler"])
def test_one_requests_model_fault_fails_it_alone_in_the_engine(reference_engine, monkeypatch, where):
    alone = [reference_images(reference_engine, request) for request in GOOD]
    batches: list[list[str]] = []
    backend = reference_engine.runner.backend
    monkeypatch.setattr(backend, "predict_noise", _poisoning(backend, where, batches))
    requests = [reference_engine.validate(spec_from_dict(r)) for r in (GOOD[0], BAD, GOOD[1])]
    first, bad, second = reference_engine.generate(requests)
    assert len(batches[0]) == 3, "the three requests never shared a call: the test proves nothing"
    assert isinstance(bad, Internal), bad
    for outcome, expected in zip((first, second), alone):
        assert not isinstance(outcome, Exception), f"a batch-mate failed with the faulty request: {outcome!r}"
        assert max_diff(outcome.images[0], expected[0]) <= 2


def test_one_requests_model_fault_fails_it_alone_over_grpc(fresh_server, reference_engine, monkeypatch):
    server = fresh_server()
    engine = server.server.engine
    batches: list[list[str]] = []
    monkeypatch.setattr(engine.runner.backend, "predict_noise", _poisoning(engine.runner.backend, "unet", batches))
    # Hold the engine thread at its next step until all three calls are in its queue, so they
    # share the first UNet call.
    gate, original_step = threading.Event(), engine.step

    def gated_step() -> bool:
        gate.wait(30)
        return original_step()

    monkeypatch.setattr(engine, "step", gated_step)
    with server.client("alice") as alice, server.client("bob") as bob:
        futures = [alice.generate_future(GOOD[0], timeout=60), bob.generate_future(BAD, timeout=60),
                   bob.generate_future(GOOD[1], timeout=60)]
        assert wait_for(lambda: engine._queue.qsize() == 3), "the calls never reached the engine"
        gate.set()
        error = _rpc_error(lambda: futures[1].result())
        got = [futures[0].result(), futures[2].result()]
    assert error.code() == grpc.StatusCode.INTERNAL, error.details()
    _leaks_no_path(error.details())
    assert error.details().endswith(": RuntimeError: injected fault in the UNet call")  # its own cause only
    assert len(batches[0]) == 3, batches[:3]
    for response, request in zip(got, GOOD):
        assert max_diff(png_pixels(response.images[0].png), reference_images(reference_engine, request)[0]) <= 2
    assert server.wait_engine_empty(5)
    with server.client("alice") as alice:
        assert alice.generate({**SMALL, "seed": 5}, timeout=60).images  # and the server goes on


# -- (d) the engine thread dies: NOT_SERVING, every call UNAVAILABLE, the process exits non-zero ---


def _health_watch(target: str) -> tuple[grpc.Channel, Iterator[Any]]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(target)
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    return channel, stream


def test_engine_thread_death_ends_every_call_with_unavailable_and_health_not_serving(fresh_server, caplog):
    from grpc_health.v1 import health_pb2

    # One small request may be in the engine at a time: the second and third wait in admission.
    server = fresh_server(admission=AdmissionConfig(64 * SMALL_COST, 64 * SMALL_COST, SMALL_COST))
    engine, core = server.server.engine, server.core
    channel, watch = _health_watch(server.target)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    original_step = engine.step

    def dying_step() -> bool:
        if engine.idle:
            return original_step()
        wait_for(lambda: len(core.jobs) == 3, timeout=10)  # one in the engine, two queued
        raise SystemError("injected engine fault")

    engine.step = dying_step  # the instance's attribute: the engine thread calls engine.step()
    with caplog.at_level(logging.INFO), server.client("alice") as alice:
        t = time.monotonic()
        calls = [alice.generate_future({**SMALL, "seed": i}, timeout=20) for i in range(2)]
        stream = alice.generate_stream({**SMALL, "seed": 2}, timeout=20)
        errors = [_rpc_error(call.result) for call in calls] + [_rpc_error(lambda: list(stream))]
        elapsed = time.monotonic() - t
        assert [e.code() for e in errors] == [grpc.StatusCode.UNAVAILABLE] * 3, [e.details() for e in errors]
        assert "engine stopped" in errors[0].details()
        assert elapsed < 10, f"the calls waited {elapsed:.1f} s for an engine that was gone"
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        later = _rpc_error(lambda: alice.generate({**SMALL, "seed": 3}, timeout=10))
        assert later.code() == grpc.StatusCode.UNAVAILABLE, later.details()
    channel.close()
    assert isinstance(server.server.engine_failure, SystemError)
    server.call(server.server.wait_stopped(), timeout=10)  # the server stopped itself
    assert server.on_loop(lambda: (dict(core.jobs), core.admission.pending_cost)) == ({}, 0)
    traces = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], SystemError)]
    assert len(traces) == 1, f"the cause was logged {len(traces)} times"


DYING_SERVER = """
import sys
from sdserve.engine import Engine

original_step = Engine.step


def step(self):
    if not self.idle:  # the first request kills the engine thread
        raise SystemError("injected engine fault")
    return original_step(self)


Engine.step = step
from sdserve.cli.main import main

sys.exit(main(["serve", "--config", sys.argv[1]]))
"""


# slow: a subprocess server (18 s); the in-process test above checks the same death end to end
@pytest.mark.slow
def test_sdserve_serve_exits_non_zero_when_the_engine_thread_dies(tmp_path):
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n[models]\nserve = ["{MODEL}"]\n\n'
                      f'[registry]\ndata_dir = "{tmp_path / "data"}"\n')
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-c", DYING_SERVER, str(config)], stdout=out,
                                   stderr=subprocess.STDOUT, env=subprocess_env())
    try:
        with Client(f"127.0.0.1:{port}") as client:
            assert wait_for(lambda: _serving(client, process), timeout=120), log.read_text()
            error = _rpc_error(lambda: client.generate({**SMALL, "seed": 1}, timeout=20))
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        code = process.wait(20)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server kept running without its engine:\n{log.read_text()[-3000:]}") from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    text = log.read_text()
    assert code == 70, (code, text[-3000:])
    assert text.count("SystemError: injected engine fault") == 1, text[-3000:]


def _serving(client: Client, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"the server exited early with {process.returncode}")
    try:
        return client.health(timeout=0.5) == "SERVING"
    except grpc.RpcError:
        return False


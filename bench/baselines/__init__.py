"""The servers the load generator drives, all over the same sdserve.v1 proto, and how to start them.

    sdserve       sdserve's own server (per-row adapter stacks co-batched)
    homogeneous   sdserve's server with a batcher that co-batches only identical stacks (the
                  policy vLLM-Omni uses): bench/baselines/sdserve_server.py --policy homogeneous
    diffusers     what a user would write around one StableDiffusionPipeline: one request at a
                  time, load_lora_weights on first use, a bounded LRU of loaded adapters:
                  bench/baselines/diffusers_server.py

Each runs in its own process with one torch thread and passive OpenMP waits, so that a server and
the load generator share a 2-core machine without spinning against each other.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SYSTEMS = ("sdserve", "homogeneous", "diffusers")


def tenant_keys(count: int) -> list[str]:
    """API keys of the bench tenants; every bench server is configured with these."""
    return [f"bench-tenant-{i}" for i in range(count)]


def tenant_name(key: str) -> str:
    return key  # the bench key doubles as the tenant's name: both are public test values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    # One torch thread per process: the server and the generator share two cores.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1")
    return env


def server_command(system: str, port: int, data_dir: Path, model: str, tenants: int, max_rows: int,
                   cache: int) -> list[str]:
    if system == "diffusers":
        return [sys.executable, "-m", "bench.baselines.diffusers_server", "--port", str(port), "--data",
                str(data_dir), "--model", model, "--cache", str(cache)]
    policy = "homogeneous" if system == "homogeneous" else "mixed"
    return [sys.executable, "-m", "bench.baselines.sdserve_server", "--port", str(port), "--data", str(data_dir),
            "--model", model, "--tenants", str(tenants), "--policy", policy, "--max-batch-rows", str(max_rows)]


def wait_serving(target: str, process: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    from sdserve.client import Client

    deadline = time.monotonic() + timeout
    with Client(target) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{log.name}: server exited early:\n{log.read_text()[-4000:]}")
            try:
                if client.health(timeout=0.5) == "SERVING":
                    return
            except Exception:  # not listening yet
                time.sleep(0.2)
    raise RuntimeError(f"{log.name}: server did not start within {timeout:.0f} s")


@contextmanager
def launch(system: str, work_dir: Path, model: str, tenants: int, max_rows: int = 32,
           cache: int = 8, log_dir: Path | None = None) -> Iterator[str]:
    """Start one bench server on a free loopback port; yields its target, stops it on exit.
    Its data lives in `work_dir`, its log in `log_dir` (default `work_dir`)."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; systems are {', '.join(SYSTEMS)}")
    port = free_port()
    data_dir = work_dir / f"{system}-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir or work_dir) / f"server-{system}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(server_command(system, port, data_dir, model, tenants, max_rows, cache),
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, env=server_env())
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(target, process, log)
        yield target
    finally:
        stop_server(process)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then kill if it has not exited within 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

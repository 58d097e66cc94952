"""Server test set-up: an in-process server on its own event-loop thread, tenants, LoRA files.

The server runs in this process (its own asyncio loop on a thread, its engine on another), so
tests can look inside it (the engine's batch, the admission counters) while talking to it over
real loopback gRPC. Tests that need a separate process (SIGTERM, Node.js) start `sdserve serve`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdserve.client import Client
from sdserve.engine import Engine, EngineConfig
from sdserve.server.app import Server
from sdserve.server.config import (
    Config,
    ModelsConfig,
    RegistryConfig,
    ServerConfig,
    TenantConfig,
    hash_key,
)

MODEL = "tiny-sd1"
KEYS = {"alice": "alice-key", "bob": "bob-key", "admin": "admin-key"}


def tenants(**overrides: Any) -> tuple[TenantConfig, ...]:
    return tuple(
        TenantConfig(name, key_sha256=hash_key(key), admin=name == "admin", **overrides.get(name, {}))
        for name, key in KEYS.items()
    )


def make_config(data_dir: Path, models: tuple[str, ...] = (MODEL,), **sections: Any) -> Config:
    base = Config(
        server=ServerConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=10.0),
        models=ModelsConfig(serve=models),
        registry=RegistryConfig(data_dir=str(data_dir)),
        tenants=tenants(),
    )
    return replace(base, **sections)


class ServerThread:
    """A Server on a private event loop in a background thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.server = Server(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start())
        return self

    def call(self, coroutine: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def on_loop(self, fn: Any) -> Any:
        """Run a plain function on the server's loop (where admission state lives) and return its value."""

        async def run() -> Any:
            return fn()

        return self.call(run())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def core(self) -> Any:
        return self.server.core

    def client(self, tenant: str | None = "alice", **kwargs: Any) -> Client:
        return Client(self.target, api_key=KEYS[tenant] if tenant else None, **kwargs)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def wait_engine_empty(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.server.engine.batcher) == 0 and self.on_loop(lambda: self.core.admission.pending_cost) == 0:
                return True
            time.sleep(0.01)
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerThread]:
    thread = ServerThread(make_config(tmp_path_factory.mktemp("registry"))).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="session")
def reference_engine() -> Engine:
    """An in-process engine: the oracle for what the server must return for the same request."""
    return Engine(EngineConfig(max_batch_rows=16))


def reference_images(engine: Engine, request: dict[str, Any]) -> list[np.ndarray]:
    from sdserve.api.convert import spec_from_dict

    (outcome,) = engine.generate([engine.validate(spec_from_dict(request))])
    assert not isinstance(outcome, Exception), outcome
    return outcome.images


def png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# -- LoRA files for the tiny model ------------------------------------------------------------


@pytest.fixture(scope="session")
def lora_bytes() -> dict[str, bytes]:
    """Three valid PEFT-layout LoRAs for tiny-sd1 and one for tiny-sdxl, as file bytes."""
    import safetensors.torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from sdserve.models.builtin import builtin_path
    from tests.adapters.lora_factory import make_peft_lora, peft_file_contents

    def make(model_name: str, seed: int) -> bytes:
        # A fresh UNet: the engine's own modules get wrapped once it serves adapters.
        unet = UNet2DConditionModel.from_pretrained(builtin_path(model_name), subfolder="unet")
        components = {"unet": unet}
        lora = make_peft_lora(components, {"unet": LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"])}, seed)
        tensors, metadata = peft_file_contents(lora)
        return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)

    return {"sd1_a": make(MODEL, 1), "sd1_b": make(MODEL, 2), "sd1_c": make(MODEL, 4), "sdxl": make("tiny-sdxl", 3)}


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll `predicate` every 20 ms until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- a server in a subprocess -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    # Two cores shared with the test process: no spinning OpenMP waits, one torch thread.
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def start_subprocess_server(tmp_path: Path, config_text: str) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(config_text.replace("@PORT@", str(port)).replace("@DATA@", str(tmp_path / "data")))
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "sdserve.cli.main", "serve", "--config", str(config)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=subprocess_env(),
    )
    client = Client(f"127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log.read_text()}")
            try:
                if client.health(timeout=0.5) == "SERVING":
                    return process, port, log
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start:\n{log.read_text()}")
    finally:
        client.close()

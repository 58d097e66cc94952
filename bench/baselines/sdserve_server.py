"""sdserve's own server for the load bench, with the mixed-stack batcher or a homogeneous one.

    python -m bench.baselines.sdserve_server --port 50061 --data /tmp/d --model tiny-sd1 \
        --tenants 4 --policy mixed|homogeneous

`mixed` is the production engine unchanged. `homogeneous` is baseline (b): the same server, engine,
residency and kernels, but a batcher that co-batches only requests whose whole adapter stack
(files, scales, start/end) equals that of the request chosen first, as vLLM-Omni does. The
policy is swapped in by subclassing (Batcher, Engine) here, so the production server has no
switch for it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import torch

from bench.baselines import tenant_keys, tenant_name
from sdserve.engine import Engine, EngineConfig, ModelStore
from sdserve.engine.batcher import Batcher
from sdserve.engine.state import RequestState
from sdserve.server.config import (
    Config,
    ModelsConfig,
    RegistryConfig,
    ServerConfig,
    TenantConfig,
    hash_key,
)
from sdserve.server.variants import VariantConfig

StackKey = tuple[tuple[str, float, float, float], ...]


def stack_key(state: RequestState) -> StackKey:
    """A request's whole stack; `source` is the registry's content-addressed file, so equal
    sources mean equal adapter digests."""
    return tuple((entry.source, entry.scale, entry.start, entry.end) for entry in state.request.adapters)


class HomogeneousBatcher(Batcher):
    """Batcher whose UNet calls hold only requests with one identical adapter stack.

    The first request is chosen as the production batcher chooses it (least recently stepped
    first), so requests with rare stacks still take turns; the batch is then filled with
    same-stack requests only."""

    def compatible(self, first: RequestState, other: RequestState) -> bool:
        return stack_key(first) == stack_key(other)


class HomogeneousEngine(Engine):
    """The production engine with the homogeneous batcher in place of the mixed one."""

    def __init__(self, config: EngineConfig | None = None, models: ModelStore | None = None) -> None:
        super().__init__(config, models)
        self.batcher = HomogeneousBatcher(self.config.max_batch_rows)


def bench_config(data_dir: Path, model: str, tenants: int, port: int = 0, max_batch_rows: int = 32,
                 variants: tuple[str, ...] = ()) -> Config:
    """The bench's server configuration: loopback, keyed bench tenants, no metrics port; `variants`
    are fused directories of `model` served as compiled variants (bench/load_hot.py)."""
    return Config(
        server=ServerConfig(host="127.0.0.1", port=port, metrics_port=None, grace_seconds=5.0, log_level="WARNING"),
        models=ModelsConfig(serve=(model,)),
        engine=EngineConfig(max_batch_rows=max_batch_rows),
        registry=RegistryConfig(data_dir=str(data_dir)),
        tenants=tuple(TenantConfig(tenant_name(key), key_sha256=hash_key(key), max_adapters=1000)
                      for key in tenant_keys(tenants)),
        variants=tuple(VariantConfig(model=model, dir=str(directory)) for directory in variants),
    )


def build_engine(config: Config, policy: str) -> Engine:
    store = ModelStore(config.engine, default_model=config.models.default_model)
    cls = HomogeneousEngine if policy == "homogeneous" else Engine
    return cls(config.engine, models=store)


async def serve(config: Config, policy: str) -> None:
    from sdserve.server.app import Server

    server = Server(config, engine=build_engine(config, policy))
    await server.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(server.drain(grace=2.0)))
    await server.wait_stopped()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="tiny-sd1")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--policy", choices=("mixed", "homogeneous"), default="mixed")
    parser.add_argument("--max-batch-rows", type=int, default=32)
    parser.add_argument("--variant", action="append", default=[], help="a fused dir of --model to serve as a variant")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from sdserve.cli.common import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = bench_config(args.data, args.model, args.tenants, args.port, args.max_batch_rows, tuple(args.variant))
    asyncio.run(serve(config, args.policy))


if __name__ == "__main__":
    main()

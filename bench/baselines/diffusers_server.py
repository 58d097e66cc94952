"""Baseline (a): the server a user would write around one diffusers StableDiffusionPipeline.

    python -m bench.baselines.diffusers_server --port 50062 --data /tmp/d --model tiny-sd1 --cache 8

One pipeline, one request at a time (an asyncio.Lock; the pipeline runs on a worker thread).
Adapters are loaded with `load_lora_weights` on first use and kept in a bounded LRU cache of
`--cache` loaded adapters (the evicted one is unloaded with `delete_adapters`); each request
activates its stack with `set_adapters` and, where an entry has a start/end window, switches the
active set at step boundaries from `callback_on_step_end`. It speaks the sdserve.v1 proto
(ImageGeneration.Generate/GenerateStream, Adapters.UploadAdapter; the rest is UNIMPLEMENTED), so
the same load generator drives it. Tenants are told apart by their bearer key.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sdserve.engine.activity import active_at
from sdserve.engine.png import encode_png
from sdserve.engine.schedulers import resolve_scheduler
from sdserve.protos.sdserve.v1 import sdserve_pb2 as pb
from sdserve.protos.sdserve.v1 import sdserve_pb2_grpc as rpc

Stack = list[tuple[str, float, float, float]]  # (adapter name in the pipeline, scale, start, end)


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return str(value).partition(" ")[2].strip()
    return ""


class Pipeline:
    """The pipeline, its LRU of loaded adapters, and one request's run. Used from one thread."""

    def __init__(self, model: str, cache: int) -> None:
        import diffusers

        from sdserve.models.builtin import builtin_path

        path = builtin_path(model) if "/" not in model else Path(model)
        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
        self.pipe.set_progress_bar_config(disable=True)
        self.base_scheduler_config = self.pipe.scheduler.config
        self.cache = cache
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.busy = threading.Lock()

    def ensure_loaded(self, names: list[str], paths: dict[str, Path]) -> float:
        """Load what the stack needs, evicting least-recently-used others; -> seconds spent."""
        started = time.perf_counter()
        for name in names:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            while len(self.loaded) >= self.cache:
                victim = next((n for n in self.loaded if n not in names), None)
                if victim is None:
                    break  # the stack alone exceeds the cache: hold it all for this request
                del self.loaded[victim]
                self.pipe.delete_adapters(victim)
            self.pipe.load_lora_weights(str(paths[name]), adapter_name=name)
            self.loaded[name] = None
        return time.perf_counter() - started

    def activate(self, stack: Stack, step: int, steps: int) -> tuple[str, ...]:
        active = [(name, scale) for name, scale, start, end in stack if active_at(step, steps, start, end)]
        if not self.loaded:
            return ()
        if not active:
            self.pipe.disable_lora()
            return ()
        self.pipe.enable_lora()
        self.pipe.set_adapters([n for n, _ in active], adapter_weights=[s for _, s in active])
        return tuple(f"{n}:{s}" for n, s in active)

    def run(self, request: Any, stack: Stack, paths: dict[str, Path], on_step: Callable[[int, int], None]) -> dict:
        with self.busy:  # the pipeline holds one adapter state: never two runs at once
            return self._run(request, stack, paths, on_step)

    def _run(self, request: Any, stack: Stack, paths: dict[str, Path], on_step: Callable[[int, int], None]) -> dict:
        import diffusers

        adapter_load = self.ensure_loaded([name for name, *_ in stack], paths)
        choice = resolve_scheduler(request.scheduler or "euler")
        self.pipe.scheduler = getattr(diffusers, choice.class_name).from_config(
            self.base_scheduler_config, **choice.overrides)
        steps = request.steps
        current = self.activate(stack, 0, steps)
        started = time.perf_counter()
        denoised = started

        def step_end(pipe: Any, index: int, timestep: Any, kwargs: dict) -> dict:
            nonlocal current, denoised
            on_step(index + 1, steps)
            denoised = time.perf_counter()
            if index + 1 < steps:
                wanted = tuple(f"{n}:{s}" for n, s, a, b in stack if active_at(index + 1, steps, a, b))
                if wanted != current:
                    current = self.activate(stack, index + 1, steps)
            return kwargs

        generator = torch.Generator().manual_seed(request.seed)
        images = self.pipe(
            request.prompt, num_inference_steps=steps, guidance_scale=request.guidance_scale,
            width=request.width, height=request.height, generator=generator, output_type="np",
            callback_on_step_end=step_end,
        ).images
        pngs = [encode_png((image * 255).round().clip(0, 255).astype("uint8"), request.prompt) for image in images]
        done = time.perf_counter()
        return {"pngs": pngs, "adapter_load": adapter_load, "denoise": denoised - started, "decode": done - denoised}


class DiffusersServicer(rpc.ImageGenerationServicer, rpc.AdaptersServicer):
    def __init__(self, pipeline: Pipeline, data_dir: Path) -> None:
        self.pipeline = pipeline
        self.data_dir = data_dir
        self.registry: dict[tuple[str, str], str] = {}  # (tenant, name) -> sha256
        self.lock = asyncio.Lock()  # one request at a time: the pipeline holds one adapter state

    async def UploadAdapter(self, chunks: Any, context: grpc.aio.ServicerContext) -> Any:
        header, data = None, bytearray()
        async for chunk in chunks:
            if chunk.WhichOneof("chunk") == "header":
                header = chunk.header
            else:
                data.extend(chunk.data)
        if header is None or not header.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first chunk must be a header with a name")
        digest = hashlib.sha256(data).hexdigest()
        if header.sha256 and header.sha256.lower() != digest:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sha256 does not match the received bytes")
        (self.data_dir / f"{digest}.safetensors").write_bytes(bytes(data))
        self.registry[(tenant_of(context), header.name)] = digest
        return pb.AdapterInfo(name=header.name, kind="lora", family=header.family or "sd1", sha256=digest,
                              size=len(data), created=time.time())

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        result = None
        async for event in self._run(request, context, stream=False):
            result = event
        return result

    async def GenerateStream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for event in self._run(request, context, stream=True):
            yield event

    async def _run(self, request: Any, context: grpc.aio.ServicerContext, stream: bool) -> AsyncIterator[Any]:
        arrived = time.perf_counter()
        tenant = tenant_of(context)
        stack: Stack = []
        paths: dict[str, Path] = {}
        used = []
        for ref in request.adapters:
            digest = self.registry.get((tenant, ref.name))
            if digest is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {ref.name!r} is not registered")
            name = f"a{digest[:16]}"  # PEFT adapter names must be identifiers
            paths[name] = self.data_dir / f"{digest}.safetensors"
            scale = ref.scale if ref.HasField("scale") else 1.0
            stack.append((name, scale, ref.start if ref.HasField("start") else 0.0, ref.end if ref.HasField("end") else 1.0))
            used.append(pb.AdapterUsed(name=ref.name, sha256=digest, kind="lora"))
        events: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_step(step: int, total: int) -> None:  # on the worker thread
            if stream:
                loop.call_soon_threadsafe(events.put_nowait, pb.GenerateEvent(
                    progress=pb.Progress(step=step, total_steps=total)))

        if stream:
            yield pb.GenerateEvent(queued=pb.Queued(request_id="", queue_position=0))
        async with self.lock:
            admitted = time.perf_counter()
            work = asyncio.ensure_future(asyncio.to_thread(self.pipeline.run, request, stack, paths, on_step))
            getter: asyncio.Future | None = None
            try:
                while stream and not work.done():
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield getter.result()
                    else:
                        getter.cancel()
                outcome = await work
            except asyncio.CancelledError:
                # The caller went away (deadline, cancel) but the pipeline thread runs on: keep the
                # lock until it ends, so that the next request never shares the pipeline with it.
                if getter is not None:
                    getter.cancel()
                await asyncio.wait({work})
                raise
        while not events.empty():
            yield events.get_nowait()
        timings = pb.GenerationTimings(queue=admitted - arrived, adapter_load=outcome["adapter_load"],
                                       denoise=outcome["denoise"], decode=outcome["decode"],
                                       total=time.perf_counter() - arrived)
        response = pb.GenerateResponse(
            images=[pb.GeneratedImage(png=png, width=request.width, height=request.height, index=i)
                    for i, png in enumerate(outcome["pngs"])],
            seed=request.seed, timings=timings, adapters=used, model=request.model)
        yield pb.GenerateEvent(result=response) if stream else response


async def start(port: int, data_dir: Path, model: str, cache: int) -> tuple[grpc.aio.Server, int]:
    """Load the pipeline and start serving on 127.0.0.1:`port` (0 = a free port); -> (server, port)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    pipeline = await asyncio.to_thread(Pipeline, model, cache)
    servicer = DiffusersServicer(pipeline, data_dir)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)])
    rpc.add_ImageGenerationServicer_to_server(servicer, server)
    rpc.add_AdaptersServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise OSError(f"could not bind 127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


async def serve(port: int, data_dir: Path, model: str, cache: int) -> None:
    server, _ = await start(port, data_dir, model, cache)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    await server.stop(grace=2.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="tiny-sd1")
    parser.add_argument("--cache", type=int, default=8, help="most adapters loaded in the pipeline at once")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from sdserve.cli.common import quiet_libraries

    quiet_libraries()
    asyncio.run(serve(args.port, args.data, args.model, args.cache))


if __name__ == "__main__":
    main()

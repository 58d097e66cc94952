"""What the HTTP/JSON gateway adds to a call: the same requests over gRPC and over HTTP, interleaved.

    python -m bench.http_gateway [--model default] [--steps 20] [--size 64] [--repeats 10] [--out FILE.json]

One in-process server (`[server] http_port`) serves both. Each repeat times, back to back and in
alternating order, `Generate` over gRPC and `POST /v1/generate` (and `/v1/generate:stream`, read to
its end), plus the cheapest authenticated call both ways (`ListModels`, `GET /v1/models`), which
shows the relay's own cost without a UNet. Ratios are paired per repeat (HTTP / gRPC); the table
gives the median and the range. The HTTP images are checked equal to gRPC's (0/255) first.
docs/benchmarks.md, "HTTP gateway", has the results.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import print_table, write_json

DEFAULT_OUT = Path(tempfile.gettempdir()) / "sdserve-bench" / "http_gateway.json"


class _ServerOnThread:
    """A Server on its own event loop in a thread (the bench talks to it over sockets only)."""

    def __init__(self, config: Any) -> None:
        from sdserve.server.app import Server

        self.server = Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> _ServerOnThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(600)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _fetch(url: str, body: dict[str, Any] | None = None) -> bytes:
    """GET `url`, or POST `body` as JSON; -> the response body, read to its end."""
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=600) as response:
        return response.read()


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a built-in model name or directory (default: default)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="width and height in pixels")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    import numpy as np
    from PIL import Image

    from sdserve.client import Client
    from sdserve.server.config import Config, ModelsConfig, RegistryConfig, ServerConfig

    data_dir = tempfile.mkdtemp(prefix="sdserve-bench-http-")
    config = Config(server=ServerConfig(port=0, http_port=0), models=ModelsConfig(serve=(args.model,)),
                    registry=RegistryConfig(data_dir=data_dir))
    request = {"prompt": "a large red circle on the left on a white background", "seed": 1,
               "steps": args.steps, "width": args.size, "height": args.size}
    with _ServerOnThread(config) as running, Client(f"127.0.0.1:{running.server.port}") as client:
        base = f"http://127.0.0.1:{running.server.http.port}"
        calls = {
            "generate": (lambda: client.generate(request), lambda: _fetch(f"{base}/v1/generate", request)),
            "generate:stream": (lambda: list(client.generate_stream(request)),
                                lambda: _fetch(f"{base}/v1/generate:stream", request)),
            "list models": (client.list_models, lambda: _fetch(f"{base}/v1/models")),
        }
        # Same image both ways, and a warm-up of each path.
        over_grpc = client.generate(request).images[0].png
        over_http = base64.b64decode(json.loads(_fetch(f"{base}/v1/generate", request))["images"][0]["png"])
        pixels = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
                  for png in (over_grpc, over_http)]
        max_diff = int(np.abs(pixels[0] - pixels[1]).max())
        samples: dict[str, dict[str, list[float]]] = {name: {"grpc": [], "http": []} for name in calls}
        for repeat in range(args.repeats):
            for name, (grpc_call, http_call) in calls.items():
                order = [("grpc", grpc_call), ("http", http_call)]
                for path, fn in order if repeat % 2 == 0 else order[::-1]:
                    samples[name][path].append(_timed(fn)[0])
    rows, results = [], {}
    for name, by_path in samples.items():
        ratios = [h / g for g, h in zip(by_path["grpc"], by_path["http"])]
        extra_ms = [1000 * (h - g) for g, h in zip(by_path["grpc"], by_path["http"])]
        results[name] = {**by_path, "ratio": ratios, "extra_ms": extra_ms}
        rows.append([name, f"{1000 * statistics.median(by_path['grpc']):.1f}",
                     f"{1000 * statistics.median(by_path['http']):.1f}",
                     f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})",
                     f"{statistics.median(extra_ms):+.1f} ({min(extra_ms):+.1f}..{max(extra_ms):+.1f})"])
    print(f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, {args.repeats} repeats; "
          f"HTTP image vs gRPC image: max diff {max_diff}/255")
    print_table(["call", "gRPC ms (median)", "HTTP ms (median)", "HTTP/gRPC (min-max)", "HTTP - gRPC ms (range)"], rows)
    path = write_json("http_gateway", {"model": args.model, "size": args.size, "steps": args.steps,
                                       "repeats": args.repeats, "image_max_diff": max_diff, "samples": results},
                      args.out)
    print(f"wrote {path}")
    return 0 if max_diff == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

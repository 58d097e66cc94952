"""Prometheus metrics, in Triton's naming style, served as text over HTTP on their own port.

Each server owns a CollectorRegistry of its own (several servers in one test process must not
share counters). The adapter-cache metrics are declared now and stay at zero until the engine
reports its residency events; their names are part of the API from day one.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sdserve.engine import EngineEvent

_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, tenant_labels: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.tenant_labels = tenant_labels
        r = self.registry
        self.request_success = Counter(
            "sdserve_request_success", "Calls that finished OK, by method", ["method"], registry=r
        )
        self.request_failure = Counter(
            "sdserve_request_failure", "Calls that failed, by method and gRPC status code", ["method", "code"], registry=r
        )
        # Per-tenant labels only when the operator asks: a metrics reader would otherwise learn
        # every tenant's name and load.
        self.refused = Counter(
            "sdserve_admission_refused", "Generate calls refused by admission (RESOURCE_EXHAUSTED)",
            ["tenant"] if tenant_labels else [], registry=r,
        )
        # A served call's latencies by model (as requested) and backend ("eager", "fused", "onnxruntime"),
        # and by tenant only with tenant_labels (as above).
        served_labels = ["model", "backend", *(["tenant"] if tenant_labels else [])]
        self.queue_duration = Histogram(
            "sdserve_queue_duration_seconds", "Time from arrival to the engine's admission", served_labels,
            buckets=_SECONDS, registry=r,
        )
        self.adapter_load_duration = Histogram(
            "sdserve_adapter_load_duration_seconds", "Time loading a request's adapters", buckets=_SECONDS, registry=r
        )
        self.denoise_duration = Histogram(
            "sdserve_denoise_duration_seconds", "Time from a request's first to last step", buckets=_SECONDS, registry=r
        )
        self.decode_duration = Histogram(
            "sdserve_decode_duration_seconds", "Time decoding a request's latents", buckets=_SECONDS, registry=r
        )
        self.request_duration = Histogram(
            "sdserve_request_duration_seconds", "Time from a Generate call's arrival to its result", served_labels,
            buckets=_SECONDS, registry=r,
        )
        self.unet_rows = Histogram(
            "sdserve_unet_batch_rows", "UNet rows per UNet call (batch occupancy)", buckets=_ROWS, registry=r
        )
        self.unet_duration = Histogram(
            "sdserve_unet_step_duration_seconds", "Duration of one engine step with a UNet call", buckets=_SECONDS, registry=r
        )
        self.pending_cost = Gauge("sdserve_pending_cost", "Admitted cost (pixels x steps x rows) queued or running", registry=r)
        self.inflight_cost = Gauge("sdserve_inflight_cost", "Cost released into the engine", registry=r)
        self.queued_requests = Gauge("sdserve_queued_requests", "Requests waiting in the fair queues", registry=r)
        self.backend_requests = Counter(
            "sdserve_backend_requests", "Generate calls answered, by model (as requested), backend (eager, fused) "
            "and compiled variant (\"\" on the eager path)", ["model", "backend", "variant"], registry=r,
        )
        # Adapter residency lives in the engine; these are read from its counters at scrape time.
        self._adapter_sources: list[Callable[[], Iterable[Any]]] = []
        r.register(_ResidencyCollector(self._adapter_sources))
        self.adapter_upload_bytes = Counter("sdserve_adapter_upload_bytes", "Bytes of adapters registered", registry=r)
        # Rows of the step events heard since the last finished step (engine thread only).
        self._rows_lock = threading.Lock()
        self._rows_by_request: dict[str, int] = {}
        self._rows_this_step = 0
        self._http: Any = None

    def watch_adapters(self, source: Callable[[], Iterable[Any]]) -> None:
        """`source()` yields the engine's residency stats objects (hits, misses, loads,
        evictions, load_seconds, host_bytes, device_bytes), one per model serving adapters."""
        self._adapter_sources.append(source)

    # -- hooks ---------------------------------------------------------------------------------

    def outcome(self, method: str, code: str) -> None:
        if code == "OK":
            self.request_success.labels(method=method).inc()
        else:
            self.request_failure.labels(method=method, code=code).inc()

    def refused_by(self, tenant: str) -> None:
        (self.refused.labels(tenant=tenant) if self.tenant_labels else self.refused).inc()

    def served_by(self, model: str, backend: str, variant: str) -> None:
        self.backend_requests.labels(model=model, backend=backend, variant=variant).inc()

    def served(self, model: str, backend: str, tenant: str, queue_seconds: float, total_seconds: float) -> None:
        """A Generate call's result is ready: its queue and end-to-end latencies."""
        labels = {"model": model, "backend": backend, **({"tenant": tenant} if self.tenant_labels else {})}
        self.queue_duration.labels(**labels).observe(queue_seconds)
        self.request_duration.labels(**labels).observe(total_seconds)

    def track_rows(self, request_id: str, rows: int) -> None:
        with self._rows_lock:
            self._rows_by_request[request_id] = rows

    def on_engine_event(self, event: EngineEvent) -> None:
        """An engine observer: runs on the engine thread."""
        if event.kind == "step":
            self._rows_this_step += self._rows_by_request.get(event.request_id, 0)
        elif event.kind in ("done", "error"):
            with self._rows_lock:
                self._rows_by_request.pop(event.request_id, None)
            if event.result is not None:
                timings = event.result.timings
                self.denoise_duration.observe(timings.get("denoise", 0.0))
                self.decode_duration.observe(timings.get("decode", 0.0))
                if "adapter_load" in timings:
                    self.adapter_load_duration.observe(timings["adapter_load"])

    def on_step(self, elapsed: float) -> None:
        """An EngineThread step hook: one UNet call finished."""
        if self._rows_this_step:
            self.unet_rows.observe(self._rows_this_step)
        self.unet_duration.observe(elapsed)
        self._rows_this_step = 0

    # -- exposition ------------------------------------------------------------------------------

    def serve(self, host: str, port: int, token_sha256: str = "") -> int:
        """Start the HTTP endpoint (GET /metrics); returns the bound port. With `token_sha256`,
        a scrape must send `authorization: Bearer <token>` (compared by hash, in constant time)."""
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] not in ("/", "/metrics"):
                    return self._reply(404, b"not found\n", "text/plain")
                if token_sha256 and not _token_ok(self.headers.get("authorization", ""), token_sha256):
                    return self._reply(401, b"unauthorized\n", "text/plain", {"WWW-Authenticate": "Bearer"})
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)

            def _reply(self, code: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes are not worth a log line each
                pass

        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="sdserve-metrics", daemon=True).start()
        return int(self._http.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ResidencyCollector:
    """The engine's adapter-residency counters as Prometheus metrics, summed over models."""

    COUNTERS = (
        ("hits", "sdserve_adapter_cache_hits", "Adapters a request needed that were already in a device slot"),
        ("misses", "sdserve_adapter_cache_misses", "Adapters a request needed that had to be placed in a slot"),
        ("loads", "sdserve_adapter_loads", "Adapter files parsed and validated into host memory"),
        ("evictions", "sdserve_adapter_evictions", "Device slots reassigned to another adapter"),
        ("load_seconds", "sdserve_adapter_load_seconds", "Seconds spent loading adapter files"),
    )

    def __init__(self, sources: list[Callable[[], Iterable[Any]]]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        stats = [s for source in self.sources for s in source()]
        for attribute, name, help_text in self.COUNTERS:
            yield CounterMetricFamily(name, help_text, value=sum(getattr(s, attribute) for s in stats))
        resident = GaugeMetricFamily("sdserve_adapter_resident_bytes", "Bytes of adapters resident, by tier", labels=["tier"])
        for tier in ("host", "device"):
            resident.add_metric([tier], sum(getattr(s, f"{tier}_bytes") for s in stats))
        yield resident


def _token_ok(header: str, token_sha256: str) -> bool:
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).hexdigest(), token_sha256)

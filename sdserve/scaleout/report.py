"""What the front knows of each replica: residency counters the replicas report, and which
adapters each one runs or has waiting, as gauges in the shape gateway routers read (vLLM's
`vllm:lora_requests_info`: running and waiting adapter ids and the per-replica maximum)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sdserve.engine.request import EngineRequest

DIGEST_CHARS = 16  # adapter ids in gauge labels: a digest prefix, never a tenant's name


@dataclass(frozen=True)
class ReplicaReport:
    """A replica's residency counters, sent with every request's outcome (just before it), so
    the front's gauges and the bench read them without calling a particular replica."""

    replica: str
    loads: int  # adapter files parsed, summed over the replica's models
    hits: int  # adapters a step needed found in a device slot
    misses: int


@dataclass
class _Placed:
    replica: str
    digests: tuple[str, ...]
    admitted: bool = False  # the replica's engine admitted it (its adapters are resident)


@dataclass
class ReplicaBook:
    """The front's record (on its event loop) of requests on replicas and the latest reports."""

    max_stacks: int
    reports: dict[str, ReplicaReport] = field(default_factory=dict)
    placed: dict[str, _Placed] = field(default_factory=dict)  # request id -> where it is

    def sent(self, request: EngineRequest, replica: str) -> None:
        digests = tuple(sorted({e.digest[:DIGEST_CHARS] for e in request.adapters if e.digest}))
        self.placed[request.request_id] = _Placed(replica, digests)

    def admitted(self, request_id: str) -> None:
        if request_id in self.placed:
            self.placed[request_id].admitted = True

    def ended(self, request_id: str) -> None:
        self.placed.pop(request_id, None)

    def report(self, report: ReplicaReport) -> None:
        self.reports[report.replica] = report

    def adapters(self) -> dict[str, tuple[set[str], set[str]]]:
        """replica -> (running adapter ids, waiting adapter ids)."""
        by_replica: dict[str, tuple[set[str], set[str]]] = {r: (set(), set()) for r in self.reports}
        for placed in self.placed.values():
            running, waiting = by_replica.setdefault(placed.replica, (set(), set()))
            (running if placed.admitted else waiting).update(placed.digests)
        return by_replica

    def total_loads(self) -> int:
        return sum(report.loads for report in self.reports.values())


class ReplicaCollector:
    """Prometheus collector over a ReplicaBook (registered on the front's metrics registry)."""

    def __init__(self, book: ReplicaBook) -> None:
        self.book = book

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "sdserve_replica_lora_requests_info",
            "Per replica: adapters (digest prefixes) of running and waiting requests; value = scrape time",
            labels=["replica", "running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        now = time.time()
        for replica, (running, waiting) in sorted(self.book.adapters().items()):
            info.add_metric([replica, ",".join(sorted(running)), ",".join(sorted(waiting)), str(self.book.max_stacks)],
                            now)
        yield info
        loads = CounterMetricFamily("sdserve_replica_adapter_loads", "Adapter files a replica parsed",
                                    labels=["replica"])
        for replica, report in sorted(self.book.reports.items()):
            loads.add_metric([replica], report.loads)
        yield loads

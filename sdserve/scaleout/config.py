"""The scale-out configuration: one frozen dataclass, mirrored by `sdserve serve --ray` flags."""

from __future__ import annotations

from dataclasses import dataclass

from sdserve.errors import InvalidArgument

AFFINE = "affine"
LEAST_LOADED = "least_loaded"
ROUTINGS = (AFFINE, LEAST_LOADED)


@dataclass(frozen=True)
class RayConfig:
    """How the engine replicas are deployed and how requests pick one."""

    replicas: int = 1
    """Engine replicas (one per GPU; on a CPU machine, one per process)."""
    address: str | None = None
    """Ray cluster to join ("auto", "ray://host:10001"); None starts a local Ray instance that
    stops when the server does."""
    routing: str = AFFINE
    """"affine": a request goes to a replica that served its adapter stack recently (Ray Serve
    model multiplexing keyed by the stack's digests), else the least loaded one; "least_loaded":
    Ray Serve's default power-of-two-choices, blind to adapters."""
    stacks_per_replica: int = 16
    """Adapter stacks a replica is known for (Ray's multiplexed LRU); older ones route elsewhere."""
    cpus_per_replica: float = 1.0
    """Ray CPUs each replica reserves (and its torch threads on a CPU machine)."""
    gpus_per_replica: float = 0.0
    """Ray GPUs each replica reserves (1 on a GPU node: one replica per GPU)."""
    max_ongoing_requests: int = 16
    """Requests a replica holds at once (its engine batches them); more wait at the front."""
    retries: int = 1
    """How often a request whose replica died is sent to another (same seed: same image)."""
    app_name: str = "sdserve"
    """The Ray Serve application name (one per front)."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidArgument("must be at least 1", field="--replicas")
        if self.routing not in ROUTINGS:
            raise InvalidArgument(f"must be one of {', '.join(ROUTINGS)}", field="--routing")
        if self.stacks_per_replica < 1:
            raise InvalidArgument("must be at least 1", field="stacks_per_replica")
        if self.max_ongoing_requests < 1:
            raise InvalidArgument("must be at least 1", field="max_ongoing_requests")
        if self.retries < 0:
            raise InvalidArgument("must be 0 or more", field="retries")

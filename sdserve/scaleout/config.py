"""The scale-out configuration: one frozen dataclass, mirrored by `sdserve serve --ray` flags."""

from __future__ import annotations

from dataclasses import dataclass

from sdserve.errors import InvalidArgument

AFFINE = "affine"
MULTIPLEX = "multiplex"
LEAST_LOADED = "least_loaded"
ROUTINGS = (AFFINE, MULTIPLEX, LEAST_LOADED)


@dataclass(frozen=True)
class RayConfig:
    """How the engine replicas are deployed and how requests pick one."""

    replicas: int = 1
    """Engine replicas (one per GPU; on a CPU machine, one per process)."""
    address: str | None = None
    """Ray cluster to join ("auto", "ray://host:10001"); None starts a local Ray instance that
    stops when the server does."""
    routing: str = AFFINE
    """"affine": each adapter stack has a home replica, fixed by rendezvous hashing of its digests
    (router.StackAffinityRouter), left for the stack's second choice only when the home is busier
    by more than `spill_threshold`; "multiplex": Ray Serve's model multiplexing keyed by the stack's
    digests (a replica that served the stack recently, else the least loaded); "least_loaded":
    Ray Serve's default power-of-two-choices, blind to adapters."""
    spill_threshold: int = 2
    """"affine": ongoing requests by which a stack's home may exceed its second choice before the
    stack's requests go to the second choice."""
    stacks_per_replica: int = 16
    """Adapter stacks a replica is known for (Ray's multiplexed LRU, "multiplex" routing)."""
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
    attach: bool = False
    """Deploy nothing: front the running application `app_name` (deployed from a Serve config file,
    scaleout/app.py), with the settings its replicas report, and leave it running on exit."""
    store_url: str | None = None
    """Where uploaded adapter files are shared with the replicas: an fsspec URL ("file:///shared/
    sdserve", "s3://bucket/sdserve"; scaleout/store.py). The front copies each file a request
    names there once, before sending the request; a replica fetches it once into its cache
    (`<[registry] data_dir>/store-cache` on the replica's node) and checks its sha256. None =
    replicas read the front's registry paths: one node, or a shared filesystem mounted at the
    same path on every node."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidArgument("must be at least 1", field="--replicas")
        if self.routing not in ROUTINGS:
            raise InvalidArgument(f"must be one of {', '.join(ROUTINGS)}", field="--routing")
        if self.spill_threshold < 0:
            raise InvalidArgument("must be 0 or more", field="spill_threshold")
        if self.stacks_per_replica < 1:
            raise InvalidArgument("must be at least 1", field="stacks_per_replica")
        if self.max_ongoing_requests < 1:
            raise InvalidArgument("must be at least 1", field="max_ongoing_requests")
        if self.retries < 0:
            raise InvalidArgument("must be 0 or more", field="retries")
        if self.attach and not self.address:
            raise InvalidArgument("needs --address (the cluster that runs the application)", field="--attach")
        if self.store_url is not None and "://" not in self.store_url:
            # A bare path would be read as the front's local directory by fsspec and then by each
            # replica's own: say which filesystem (file:// for a shared mount).
            raise InvalidArgument("must be a URL such as file:///shared/sdserve or s3://bucket/sdserve",
                                  field="--store-url")

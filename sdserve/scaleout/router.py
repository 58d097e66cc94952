"""Adapter-affine routing as a Ray Serve request router: each adapter stack has a home replica.

Why not Ray Serve's own multiplexed routing: it learns which replica holds a stack from the
replicas' reports, so the concurrent first requests of a new stack land on whichever replica is
least loaded, and requests spill to any replica when the one holding the stack is busy; over a
run every popular stack ends up resident on every replica, and each replica's cache holds the
same few stacks (measured: 1.3-1.5x fewer adapter loads than adapter-blind routing, where an
exact partition of the stacks would give the cache-size limit, bench/scaleout.py).

Here the home of a stack is fixed by rendezvous (highest-random-weight) hashing of the stack
key with each replica's id: score(key, replica) = sha256(key | replica id), home = the
replica of the highest score, second choice = the next. So
- the stacks are split between the replicas without any shared state or reports: the routers
  of several fronts agree, and a replica's cache holds only its share of the stacks;
- a replica that dies or is added moves only the stacks whose home it was or becomes;
- a home busier than its stack's second choice by more than `spill_threshold` requests sends
  the request there: at most two replicas hold a hot stack, and a burst of one popular stack
  does not queue on one replica while the other idles;
- once a stack has been sent to its second choice (the router remembers the last few stacks it
  sent to each replica), both hold it and neither pays a load for it, so its requests go to the
  less busy of the two: a hot stack spreads over its two replicas by queue length, while the
  cold stacks, which would thrash the caches if spread, stay home.
Requests without adapters (no key) go to the less loaded of two random replicas, Ray Serve's
default power-of-two choices.

`rank_replicas` is the policy, a pure function; `StackAffinityRouter` is its Ray Serve seam.
Ray is imported here: import this module only where a deployment is built or its router runs.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import RequestRouter

from sdserve.scaleout.config import RayConfig

DEFAULT_SPILL_THRESHOLD = RayConfig.spill_threshold  # one default, the config's (docs/benchmarks.md: 2)


def rendezvous_score(key: str, replica: str) -> int:
    """The weight of `replica` for stack `key`: the first 8 bytes of sha256(key | replica)."""
    return int.from_bytes(hashlib.sha256(f"{key}|{replica}".encode()).digest()[:8], "big")


def rank_replicas(key: str, replicas: Sequence[str], queue_lengths: dict[str, int],
                  spill_threshold: int = DEFAULT_SPILL_THRESHOLD, second_holds: bool = False) -> list[list[str]]:
    """Replica ids in the order a request of stack `key` should try them, as ranks (lists).

    `queue_lengths` are the router's latest known ongoing requests per replica (missing: 0).
    The home (highest rendezvous score) comes first unless it is busier than the second choice
    by more than `spill_threshold`; then the second choice leads. The rest follow, by score.
    `second_holds`: the second choice was sent this stack recently (a hot stack that spilled),
    so it holds it too and costs no load there: then the less busy of the two leads (the home on
    a tie), and a hot stack's requests spread over both replicas instead of queueing at home.
    """
    ordered = sorted(replicas, key=lambda replica: rendezvous_score(key, replica), reverse=True)
    if len(ordered) < 2:
        return [ordered]
    home, second, rest = ordered[0], ordered[1], ordered[2:]
    gap = queue_lengths.get(home, 0) - queue_lengths.get(second, 0)
    if gap > (0 if second_holds else spill_threshold):
        home, second = second, home
    ranks = [[home], [second]]
    if rest:
        ranks.append(rest)
    return ranks


class StackAffinityRouter(RequestRouter):
    """Ray Serve's router for the EngineReplica deployment under "affine" routing: the stack key
    arrives as the request's multiplexed model id (dispatch.py)."""

    def initialize_state(self, spill_threshold: int = DEFAULT_SPILL_THRESHOLD, remembered: int = RayConfig.stacks_per_replica,
                         **_unused: Any) -> None:
        self.spill_threshold = spill_threshold
        # Per replica id, the last `remembered` stack keys this router sent there (an LRU): what
        # the replica most likely still holds. Kept below what a replica's cache holds, so a
        # remembered stack is rarely one the replica has already evicted.
        self.remembered = remembered
        self.sent: dict[str, OrderedDict[str, None]] = {}

    def _note_sent(self, replica: str, key: str) -> None:
        keys = self.sent.setdefault(replica, OrderedDict())
        keys[key] = None
        keys.move_to_end(key)
        while len(keys) > self.remembered:
            keys.popitem(last=False)

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> list[list[Any]]:
        metadata = getattr(pending_request, "metadata", None)
        key = getattr(metadata, "multiplexed_model_id", "") or ""
        if not key or len(candidate_replicas) < 2:
            # Ray's default: the less loaded of two (the base class probes their queues).
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        cache = self.replica_queue_len_cache
        lengths = {}
        for replica in candidate_replicas:
            known = cache.get(replica.replica_id)
            if known is not None:
                lengths[replica.replica_id.unique_id] = known
        ids = list(by_id)
        ordered = sorted(ids, key=lambda replica: rendezvous_score(key, replica), reverse=True)
        second_holds = key in self.sent.get(ordered[1], ())
        ranks = rank_replicas(key, ids, lengths, self.spill_threshold, second_holds=second_holds)
        # The first rank is one replica, where the request goes unless that replica is full.
        self._note_sent(ranks[0][0], key)
        for gone in set(self.sent) - set(ids):  # replaced replicas: their memory is of nothing
            del self.sent[gone]
        return [[by_id[replica] for replica in rank] for rank in ranks]

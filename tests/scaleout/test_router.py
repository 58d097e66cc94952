"""The affine router's policy (rank_replicas) without a cluster: homes, balance, stability, spill."""

from __future__ import annotations

import collections

import pytest

pytest.importorskip("ray.serve.request_router", reason="needs ray[serve] (the test extra)")

from sdserve.scaleout.router import rank_replicas  # noqa: E402

REPLICAS = ["r-a", "r-b"]
KEYS = [f"{index:032x}" for index in range(64)]


def home(key: str, replicas: list[str], lengths: dict[str, int] | None = None) -> str:
    return rank_replicas(key, replicas, lengths or {})[0][0]


def test_every_stack_has_one_home_and_the_stacks_are_split_between_replicas():
    homes = collections.Counter(home(key, REPLICAS) for key in KEYS)
    assert set(homes) == set(REPLICAS)
    assert min(homes.values()) >= 24  # 64 keys over 2 replicas: hashing, not a fixed 32/32
    # Deterministic: every front's router agrees, with no shared state.
    assert [home(key, REPLICAS) for key in KEYS] == [home(key, list(reversed(REPLICAS))) for key in KEYS]
    ranks = rank_replicas(KEYS[0], REPLICAS, {})
    assert sorted(replica for rank in ranks for replica in rank) == sorted(REPLICAS)


def test_a_replaced_replica_moves_only_its_own_stacks():
    before = {key: home(key, REPLICAS + ["r-c"]) for key in KEYS}
    after = {key: home(key, ["r-a", "r-b", "r-d"]) for key in KEYS}  # r-c died, r-d replaced it
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved and all(before[key] == "r-c" or after[key] == "r-d" for key in moved)
    assert all(after[key] == before[key] for key in KEYS if before[key] != "r-c" and after[key] != "r-d")


def test_a_busy_home_spills_to_the_second_choice_only_beyond_the_threshold():
    key = KEYS[0]
    first, second = rank_replicas(key, REPLICAS, {})[0][0], rank_replicas(key, REPLICAS, {})[1][0]
    assert home(key, REPLICAS, {first: 3, second: 1}) == first  # 2 more: within the default threshold
    assert home(key, REPLICAS, {first: 4, second: 1}) == second
    assert rank_replicas(key, REPLICAS, {first: 6, second: 1}, spill_threshold=8)[0] == [first]
    assert rank_replicas(key, ["only"], {}) == [["only"]]


def test_a_stack_its_second_choice_holds_goes_to_the_less_busy_of_the_two():
    key = KEYS[0]
    first, second = rank_replicas(key, REPLICAS, {})[0][0], rank_replicas(key, REPLICAS, {})[1][0]
    held = {"second_holds": True}
    assert rank_replicas(key, REPLICAS, {first: 2, second: 2}, **held)[0] == [first]  # tie: home
    assert rank_replicas(key, REPLICAS, {first: 3, second: 2}, **held)[0] == [second]  # no load there
    assert rank_replicas(key, REPLICAS, {first: 1, second: 2}, **held)[0] == [first]


def test_the_router_remembers_what_it_sent_and_spreads_a_stack_that_spilled(monkeypatch):
    """StackAffinityRouter without Ray's machinery: its choose_replicas on stand-in replicas."""
    import asyncio
    from types import SimpleNamespace

    from sdserve.scaleout.router import StackAffinityRouter

    def replica(name: str):
        return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name, name=name))

    replicas = [replica(name) for name in REPLICAS]
    lengths: dict[str, int] = {}
    router = StackAffinityRouter.__new__(StackAffinityRouter)  # Ray's constructor wants a controller
    router.initialize_state(spill_threshold=4, remembered=2)
    cache = SimpleNamespace(get=lambda replica_id: lengths.get(replica_id.unique_id))
    monkeypatch.setattr(StackAffinityRouter, "replica_queue_len_cache", property(lambda self: cache))

    def choose(key: str) -> str:
        request = SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=key))
        return asyncio.run(router.choose_replicas(replicas, request))[0][0].replica_id.unique_id

    key = KEYS[0]
    first, second = rank_replicas(key, REPLICAS, {})[0][0], rank_replicas(key, REPLICAS, {})[1][0]
    lengths.update({first: 3, second: 0})
    assert choose(key) == first  # 3 busier: within the spill threshold, and the second never had it
    lengths.update({first: 6, second: 0})
    assert choose(key) == second  # spilled: now remembered on both
    lengths.update({first: 3, second: 2})
    assert choose(key) == second  # held by both: the less busy, although within the threshold
    for other in KEYS[1:]:  # the second's memory holds 2 stacks: enough others sent there push it out
        if rank_replicas(other, REPLICAS, {})[0][0] == second:
            lengths.update({first: 0, second: 0})
            choose(other)
    lengths.update({first: 3, second: 2})
    assert choose(key) == first  # forgotten on the second: home again

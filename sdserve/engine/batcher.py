"""Step-level continuous batching.

Requests wait in a queue until a step boundary admits them (prompts encoded, noise drawn),
then step with whatever else is running and retire after their last step. Rows of one model and
latent size share a UNet call, up to `max_rows`; when several size groups are running they take
turns, one UNet call each; inside a group, the requests that stepped least recently go first, so
a group larger than one batch rotates instead of starving its tail. A request's rows never split.

The batcher only orders work; it never touches tensors. One owner (the engine loop) calls it.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from sdserve.engine.state import GroupKey, RequestState


class Batcher:
    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._groups: OrderedDict[GroupKey, list[RequestState]] = OrderedDict()
        self._turns: deque[GroupKey] = deque()
        self.tick = 0

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def active(self) -> list[RequestState]:
        return [s for group in self._groups.values() for s in group]

    def add(self, state: RequestState) -> None:
        key = state.group_key
        if key not in self._groups:
            self._groups[key] = []
            self._turns.append(key)
        self._groups[key].append(state)

    def remove(self, state: RequestState) -> None:
        key = state.group_key
        group = self._groups.get(key)
        if group is None or state not in group:
            return
        group.remove(state)
        if not group:
            del self._groups[key]
            self._turns.remove(key)

    def compatible(self, first: RequestState, other: RequestState) -> bool:
        """May `other` share a UNet call with `first`, the request chosen first for it? Always,
        here: any mix of stacks, schedulers and guidance shares a call. (The bench's
        homogeneous-batching baseline overrides this.)"""
        return True

    def next_batch(self) -> tuple[GroupKey, list[RequestState]] | None:
        """The next group's requests for one UNet call, or None when nothing is running."""
        if not self._turns:
            return None
        key = self._turns[0]
        self._turns.rotate(-1)
        group = sorted(self._groups[key], key=lambda s: (s.last_tick, s.arrival))
        chosen: list[RequestState] = []
        rows = 0
        for state in group:
            if rows + state.rows <= self.max_rows and (not chosen or self.compatible(chosen[0], state)):
                chosen.append(state)
                rows += state.rows
        self.tick += 1
        for state in chosen:
            state.last_tick = self.tick
        # Keep arrival order inside the batch so a batch's layout does not depend on rotation.
        chosen.sort(key=lambda s: s.arrival)
        return key, chosen

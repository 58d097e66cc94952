"""Admission by cost, and fair release into the engine.

cost = width × height × steps × UNet rows (pixels × steps × CFG rows): what a request will cost
the engine, known from the validated request alone.

Two bounds decide at arrival, in O(1) and before any encoding work:
- the server's pending cost (queued + running) may not pass `max_pending_cost`;
- one tenant's pending cost may not pass `max_tenant_pending_cost`, so a tenant flooding the
  server leaves room for the others.
A request beyond either is refused with RESOURCE_EXHAUSTED at once; a request larger than a
whole bound (it could never be admitted, so retrying is pointless) with INVALID_ARGUMENT. A
refusal names only the caller's own load, never the server's (other tenants' work).

A request stays pending until its call ends, not until the engine is done with it: its cost
leaves the engine's bound when its images are made (`computed`) but counts against its tenant
until the response is delivered or the call ends (`finish`), so responses nobody reads cannot
pile up beyond the tenant's bound.

A request being validated holds its estimated cost (`hold`, returned by `admit` or `drop`), so a
burst is refused at arrival: without the hold, every request of a burst passed the early check
while the first ones were still validating, all were validated (worker threads contending for
the GIL) and the excess was refused only afterwards, tens of milliseconds late.

Admitted requests wait in one queue per tenant (highest priority first, then arrival order)
and are released into the engine while the cost running there stays within
`max_inflight_cost`. The next request released is the head of the queue of the tenant with the
least cost running (ties: the tenant served least recently), so a burst from one tenant does
not delay another tenant's request by more than the time it takes for one running request's
cost to drain.

One owner: every method runs on the asyncio event loop; nothing here locks.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from sdserve.engine.model_limits import ModelDefaults, ModelLimits
from sdserve.engine.request import EngineRequest, RequestSpec
from sdserve.errors import InvalidArgument, ResourceExhausted
from sdserve.server.config import AdmissionConfig


def request_cost(request: EngineRequest) -> int:
    return request.width * request.height * request.steps * request.rows


def estimated_cost(spec: RequestSpec, defaults: ModelDefaults, limits: ModelLimits) -> int:
    """The cost a request will have if it is valid: its fields, else the model's defaults, each
    clamped to the model's limits (so a wild value estimates as the largest valid request).

    Lets a loaded server refuse before validating (validation builds a noise scheduler, about a
    millisecond: under a burst, refusals would otherwise queue behind that work)."""
    width = min(spec.width if spec.width is not None else defaults.width, limits.max_side)
    height = min(spec.height if spec.height is not None else defaults.height, limits.max_side)
    steps = min(spec.steps if spec.steps is not None else defaults.steps, limits.max_steps)
    guidance = spec.guidance_scale if spec.guidance_scale is not None else defaults.guidance_scale
    images = min(spec.num_images if spec.num_images is not None else 1, limits.max_num_images)
    rows = max(images, 0) * (2 if guidance > 1.0 else 1)
    return max(width, 0) * max(height, 0) * max(steps, 0) * rows


@dataclass(eq=False)
class Ticket:
    """One admitted request, from admission until it leaves the engine (or is withdrawn)."""

    request: EngineRequest
    tenant: str
    priority: int
    cost: int
    seq: int
    release: Callable[[Ticket], None] = field(repr=False)
    released: bool = False
    computed: bool = False  # the engine is done with it; the response is on its way
    finished: bool = False


@dataclass(eq=False)
class Hold:
    """The estimated cost of a request being validated, counted against the bounds until
    `Admission.admit` replaces it with the validated request's own cost, or `drop` frees it."""

    tenant: str
    cost: int
    held: bool = True


class Admission:
    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._queues: dict[str, list[tuple[int, int, Ticket]]] = {}  # tenant -> heap of (-priority, seq, ticket)
        self._pending_by_tenant: dict[str, int] = {}
        self._inflight_by_tenant: dict[str, int] = {}
        self._last_served: dict[str, int] = {}
        self._seq = itertools.count()
        self._releases = itertools.count()
        self._held_by_tenant: dict[str, int] = {}
        self.pending_cost = 0
        self.held_cost = 0  # estimated costs of requests being validated (Hold)
        self.inflight_cost = 0
        self.queued = 0
        self.running = 0

    @property
    def loaded(self) -> bool:
        """Anything pending or being validated: a new request is checked before its validation."""
        return bool(self.pending_cost or self.held_cost)

    def check(self, cost: int, tenant: str) -> None:
        """Raise ResourceExhausted if a request of `cost` from `tenant` would pass a bound now
        (counting the costs held by requests still being validated)."""
        limits = self.config
        tenant_pending = self._pending_by_tenant.get(tenant, 0) + self._held_by_tenant.get(tenant, 0)
        bound = min(limits.max_pending_cost, limits.max_tenant_pending_cost)
        if cost > bound:
            raise InvalidArgument(
                f"this request's cost (width x height x steps x UNet rows = {cost}) is more than this "
                f"server admits for one tenant at once ({bound}); it can never run: ask for fewer "
                "pixels, steps or images"
            )
        if self.pending_cost + self.held_cost + cost > limits.max_pending_cost:
            # No figures: the server's pending cost is the other tenants' load.
            raise ResourceExhausted("the server is at capacity; retry later or ask for less")
        if tenant_pending + cost > limits.max_tenant_pending_cost:
            raise ResourceExhausted(
                f"this tenant's share is used up (pending cost {tenant_pending} + this request's {cost} "
                f"> {limits.max_tenant_pending_cost}); retry when earlier requests finish"
            )

    def hold(self, cost: int, tenant: str, refuse: bool = True) -> Hold | None:
        """Hold `cost` for a request about to be validated. Over a bound: raise as `check` does,
        or with `refuse=False` hold nothing and return None (validation then speaks first)."""
        try:
            self.check(cost, tenant)
        except (ResourceExhausted, InvalidArgument):
            if refuse:
                raise
            return None
        self.held_cost += cost
        self._held_by_tenant[tenant] = self._held_by_tenant.get(tenant, 0) + cost
        return Hold(tenant, cost)

    def drop(self, hold: Hold | None) -> None:
        """Free a hold (idempotent): its request was admitted, refused or failed validation."""
        if hold is None or not hold.held:
            return
        hold.held = False
        self.held_cost -= hold.cost
        left = self._held_by_tenant[hold.tenant] - hold.cost
        if left:
            self._held_by_tenant[hold.tenant] = left
        else:
            del self._held_by_tenant[hold.tenant]

    def admit(
        self, request: EngineRequest, tenant: str, release: Callable[[Ticket], None], priority: int = 0,
        hold: Hold | None = None,
    ) -> Ticket:
        """Admit or refuse at once; an admitted ticket is released (maybe before this returns).
        The request's `hold`, if any, is dropped first: its validated cost takes its place."""
        self.drop(hold)
        cost = request_cost(request)
        self.check(cost, tenant)
        tenant_pending = self._pending_by_tenant.get(tenant, 0)
        ticket = Ticket(request, tenant, priority, cost, next(self._seq), release)
        self.pending_cost += cost
        self._pending_by_tenant[tenant] = tenant_pending + cost
        heapq.heappush(self._queues.setdefault(tenant, []), (-priority, ticket.seq, ticket))
        self.queued += 1
        self._release_ready()
        return ticket

    def withdraw(self, ticket: Ticket) -> bool:
        """Drop a ticket still queued (its caller went away). False if it was already released."""
        if ticket.released or ticket.finished:
            return False
        queue = self._queues.get(ticket.tenant, [])
        for index, entry in enumerate(queue):
            if entry[2] is ticket:
                queue.pop(index)
                heapq.heapify(queue)
                break
        self.queued -= 1
        ticket.finished = True
        self._forget(ticket)
        self._release_ready()
        return True

    def computed(self, ticket: Ticket) -> None:
        """A released request's images are made: its cost leaves the engine's bound (the next
        request may go in) but stays pending against its tenant until `finish`."""
        if ticket.finished or ticket.computed or not ticket.released:
            return
        ticket.computed = True
        self._leave_engine(ticket)
        self._release_ready()

    def finish(self, ticket: Ticket) -> None:
        """A request's call is over: delivered, failed, cancelled or expired."""
        if ticket.finished:
            return
        ticket.finished = True
        if ticket.released and not ticket.computed:
            self._leave_engine(ticket)
        self._forget(ticket)
        self._release_ready()

    def _leave_engine(self, ticket: Ticket) -> None:
        self.inflight_cost -= ticket.cost
        self.running -= 1
        self._inflight_by_tenant[ticket.tenant] -= ticket.cost

    def _forget(self, ticket: Ticket) -> None:
        self.pending_cost -= ticket.cost
        self._pending_by_tenant[ticket.tenant] -= ticket.cost
        if not self._pending_by_tenant[ticket.tenant]:
            del self._pending_by_tenant[ticket.tenant]

    def _next_tenant(self) -> str | None:
        waiting = [t for t, q in self._queues.items() if q]
        if not waiting:
            return None
        return min(waiting, key=lambda t: (self._inflight_by_tenant.get(t, 0), self._last_served.get(t, -1)))

    def _release_ready(self) -> None:
        while (tenant := self._next_tenant()) is not None:
            head = self._queues[tenant][0][2]
            # A request larger than the whole bound still runs, alone, rather than never.
            if self.inflight_cost and self.inflight_cost + head.cost > self.config.max_inflight_cost:
                return
            heapq.heappop(self._queues[tenant])
            self.queued -= 1
            self.running += 1
            self.inflight_cost += head.cost
            self._inflight_by_tenant[tenant] = self._inflight_by_tenant.get(tenant, 0) + head.cost
            self._last_served[tenant] = next(self._releases)
            head.released = True
            head.release(head)

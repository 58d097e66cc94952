"""Admission by cost and fair release, on the Admission object alone (no engine, no gRPC)."""

from __future__ import annotations

import pytest

from sdserve.engine.request import EngineRequest
from sdserve.errors import InvalidArgument, ResourceExhausted
from sdserve.server.admission import Admission, request_cost
from sdserve.server.config import AdmissionConfig

UNIT = 32 * 32 * 10 * 2  # one 32x32, 10-step request with guidance


def req(name: str, steps: int = 10, side: int = 32, guidance: float = 7.5) -> EngineRequest:
    return EngineRequest(
        model="m", prompt="p", negative_prompt=None, seed=0, steps=steps, guidance_scale=guidance,
        scheduler="euler", width=side, height=side, num_images=1, request_id=name,
    )


class Recorder:
    def __init__(self) -> None:
        self.released: list[str] = []

    def __call__(self, ticket) -> None:
        self.released.append(ticket.request.request_id)


def make(pending: int, tenant: int, inflight: int) -> tuple[Admission, Recorder]:
    return Admission(AdmissionConfig(pending * UNIT, tenant * UNIT, inflight * UNIT)), Recorder()


def test_cost_is_pixels_times_steps_times_rows():
    assert request_cost(req("a")) == UNIT
    assert request_cost(req("a", guidance=1.0)) == UNIT // 2  # no CFG: one row
    assert request_cost(req("a", side=64, steps=5)) == 2 * UNIT


def test_refuses_beyond_the_bound_and_changes_nothing():
    admission, rec = make(pending=3, tenant=3, inflight=1)
    tickets = [admission.admit(req(f"r{i}"), "t", rec) for i in range(3)]
    with pytest.raises(ResourceExhausted, match="capacity"):
        admission.admit(req("r3"), "t", rec)
    assert (admission.pending_cost, admission.queued, admission.running) == (3 * UNIT, 2, 1)
    admission.finish(tickets[0])
    assert rec.released == ["r0", "r1"]
    admission.admit(req("r3"), "t", rec)  # room again


def test_tenant_bound_leaves_room_for_others():
    admission, rec = make(pending=4, tenant=2, inflight=1)
    admission.admit(req("a0"), "a", rec)
    admission.admit(req("a1"), "a", rec)
    with pytest.raises(ResourceExhausted, match="tenant"):
        admission.admit(req("a2"), "a", rec)
    admission.admit(req("b0"), "b", rec)  # b still gets in


def test_release_is_fair_between_tenants():
    admission, rec = make(pending=100, tenant=50, inflight=2)
    a = [admission.admit(req(f"a{i}"), "a", rec) for i in range(10)]
    b = admission.admit(req("b0"), "b", rec)
    assert rec.released == ["a0", "a1"]
    admission.finish(a[0])
    # b has nothing running, a has one: b goes next, ahead of a's backlog.
    assert rec.released == ["a0", "a1", "b0"]
    admission.finish(a[1])
    admission.finish(b)
    assert rec.released[-2:] == ["a2", "a3"]


def test_priority_orders_a_tenants_own_queue():
    admission, rec = make(pending=100, tenant=100, inflight=1)
    first = admission.admit(req("low0"), "t", rec)
    admission.admit(req("low1"), "t", rec, priority=0)
    admission.admit(req("high"), "t", rec, priority=5)
    admission.finish(first)
    assert rec.released == ["low0", "high"]


def test_withdraw_frees_a_queued_ticket_and_finish_is_idempotent():
    admission, rec = make(pending=100, tenant=100, inflight=1)
    running = admission.admit(req("r"), "t", rec)
    queued = admission.admit(req("q"), "t", rec)
    assert not admission.withdraw(running)  # released: the engine must cancel it instead
    assert admission.withdraw(queued)
    assert (admission.pending_cost, admission.queued) == (UNIT, 0)
    admission.finish(running)
    admission.finish(running)
    assert (admission.pending_cost, admission.inflight_cost, admission.running) == (0, 0, 0)
    assert rec.released == ["r"]


def test_a_request_larger_than_the_inflight_bound_runs_alone():
    admission, rec = make(pending=100, tenant=100, inflight=1)
    big = admission.admit(req("big", side=64), "t", rec)  # 4 units
    admission.admit(req("small"), "t", rec)
    assert rec.released == ["big"]
    admission.finish(big)
    assert rec.released == ["big", "small"]


def test_a_computed_request_leaves_the_engine_but_stays_pending_until_finished():
    admission, rec = make(pending=4, tenant=2, inflight=1)
    first = admission.admit(req("a0"), "a", rec)
    admission.admit(req("a1"), "a", rec)
    admission.computed(first)  # images made, response not yet delivered
    assert rec.released == ["a0", "a1"]  # the engine took the next one
    assert (admission.pending_cost, admission.inflight_cost) == (2 * UNIT, UNIT)
    with pytest.raises(ResourceExhausted, match="tenant"):
        admission.admit(req("a2"), "a", rec)  # the undelivered response still counts
    admission.finish(first)
    admission.admit(req("a2"), "a", rec)


def test_a_request_beyond_a_whole_bound_is_invalid_not_retryable():
    admission, rec = make(pending=8, tenant=2, inflight=1)
    with pytest.raises(InvalidArgument, match="never"):
        admission.admit(req("huge", steps=30), "a", rec)  # 3 units > the tenant's 2
    assert admission.pending_cost == 0


def test_capacity_refusal_names_no_figures_of_other_tenants():
    admission, rec = make(pending=2, tenant=2, inflight=1)
    admission.admit(req("b0"), "b", rec)
    admission.admit(req("b1"), "b", rec)
    with pytest.raises(ResourceExhausted) as refused:
        admission.admit(req("a0"), "a", rec)
    assert not any(ch.isdigit() for ch in str(refused.value))


def test_a_request_being_validated_holds_its_cost_until_admitted_or_dropped():
    admission, rec = make(pending=3, tenant=1, inflight=1)
    first = admission.hold(UNIT, "a")
    second = admission.hold(UNIT, "b")
    assert admission.loaded and admission.held_cost == 2 * UNIT and admission.pending_cost == 0
    # A burst behind them is refused at arrival, by the tenant's bound and by the server's.
    with pytest.raises(ResourceExhausted, match="tenant"):
        admission.hold(UNIT, "a")  # a holds its whole share
    admission.hold(UNIT, "c")
    with pytest.raises(ResourceExhausted, match="capacity"):
        admission.hold(UNIT, "d")
    # Admission replaces the hold by the validated cost; a failed validation drops it, once.
    admission.admit(req("a0"), "a", rec, hold=first)
    assert (admission.held_cost, admission.pending_cost) == (2 * UNIT, UNIT)
    admission.drop(second)
    admission.drop(second)
    assert admission.held_cost == UNIT
    # Idle, an oversized request holds nothing and is not refused here: validation speaks first.
    idle, _ = make(pending=1, tenant=1, inflight=1)
    assert idle.hold(5 * UNIT, "a", refuse=False) is None and not idle.loaded
    with pytest.raises(InvalidArgument):
        idle.hold(5 * UNIT, "a")

"""OpenTelemetry traces (issue 23 item 9): a Generate call's span tree from the server, made from the
request log's timestamps; the caller's W3C traceparent continued; nothing of opentelemetry when off."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import replace

import grpc
import pytest

from sdserve.errors import InvalidArgument
from sdserve.server.config import ServerConfig, check, config_from_dict
from sdserve.server.tracing import RequestTracer, make_tracer
from tests.server.conftest import KEYS, MODEL, ServerThread, make_config, subprocess_env, wait_for

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

STEPS = 3
REQUEST = {"model": MODEL, "prompt": "a red circle", "steps": STEPS, "seed": 4, "num_images": 2}
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = make_config(tmp_path_factory.mktemp("registry"))
    thread = ServerThread(replace(config, server=replace(config.server, http_port=0, metrics_port=None)))
    thread.server.tracer = RequestTracer(provider)  # what make_tracer builds, with an in-memory exporter
    thread.start()
    yield thread, exporter
    thread.stop()


def _tree(exporter, request_id: str) -> dict:
    """The finished spans of one call by name (its root found by the request id attribute)."""
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "sdserve.request" and s.attributes["sdserve.request_id"] == request_id)
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
    return {"sdserve.request": root, **children}


def test_a_generate_records_its_span_tree_with_ordered_times_and_step_events(traced):
    thread, exporter = traced
    with thread.client("alice", timeout=60) as client:
        response = client.generate(REQUEST)
    # The span is recorded as the handler ends, just after the response leaves.
    assert wait_for(lambda: any(s.name == "sdserve.request" for s in exporter.get_finished_spans()), timeout=10)
    tree = _tree(exporter, response.request_id)
    assert set(tree) == {"sdserve.request", "admission", "denoise", "decode"}  # no cold adapters: no adapter_load
    root = tree["sdserve.request"]
    assert root.parent is None  # no traceparent: a new trace
    assert root.kind.name == "SERVER" and root.status.is_ok
    attributes = dict(root.attributes)
    assert attributes["sdserve.model"] == MODEL and attributes["sdserve.steps"] == STEPS
    assert attributes["sdserve.status"] == "OK" and attributes["sdserve.backend"] == "eager"
    assert attributes["sdserve.adapters"] == () and "sdserve.tenant" not in attributes  # tenant labels off
    assert all(s.context.trace_id == root.context.trace_id for s in tree.values())
    # Phases follow each other inside the call.
    order = [root.start_time, tree["admission"].start_time, tree["admission"].end_time, tree["denoise"].start_time,
             tree["denoise"].end_time, tree["decode"].start_time, tree["decode"].end_time, root.end_time]
    assert order == sorted(order) and all(s.end_time >= s.start_time for s in tree.values())
    assert tree["admission"].start_time == root.start_time
    assert tree["denoise"].end_time > tree["denoise"].start_time and tree["decode"].end_time > tree["decode"].start_time
    # The log line's durations, as span lengths.
    for phase, span in (("queue", "admission"), ("denoise", "denoise"), ("decode", "decode")):
        length = (tree[span].end_time - tree[span].start_time) / 1e9
        assert abs(length - getattr(response.timings, phase)) < 1e-3, phase
    # One event per UNet call the request took part in: steps 1..N, rows of the whole batch
    # (this request alone: 2 images x 2 for classifier-free guidance), in time order.
    events = tree["denoise"].events
    assert [e.name for e in events] == ["step"] * STEPS
    assert [e.attributes["sdserve.step"] for e in events] == list(range(1, STEPS + 1))
    assert [e.attributes["sdserve.batch_rows"] for e in events] == [4] * STEPS
    stamps = [e.timestamp for e in events]
    assert stamps == sorted(stamps)
    slack = 10_000_000  # 10 ms: the phase chain is rebuilt from durations, the events are absolute times
    assert tree["denoise"].start_time - slack <= stamps[0] and stamps[-1] <= tree["denoise"].end_time + slack


def test_a_traceparent_continues_the_callers_trace_and_a_refusal_is_an_error_span(traced):
    thread, exporter = traced
    exporter.clear()
    with thread.client("alice", timeout=60) as client:
        client._metadata.append(("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01"))
        response = client.generate({**REQUEST, "num_images": 1, "steps": 2})
        with pytest.raises(grpc.RpcError) as invalid:
            client.generate({**REQUEST, "steps": -1})
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wait_for(lambda: sum(s.name == "sdserve.request" for s in exporter.get_finished_spans()) >= 2, timeout=10)
    tree = _tree(exporter, response.request_id)
    root = tree["sdserve.request"]
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert root.parent is not None and f"{root.parent.span_id:016x}" == PARENT_SPAN and root.parent.is_remote
    assert [e.attributes["sdserve.batch_rows"] for e in tree["denoise"].events] == [2, 2]
    refused = [s for s in exporter.get_finished_spans()
               if s.name == "sdserve.request" and s.attributes["sdserve.status"] == "INVALID_ARGUMENT"]
    assert len(refused) == 1 and not refused[0].status.is_ok
    assert f"{refused[0].context.trace_id:032x}" == TRACE_ID
    # Refused in validation: no phase reached, so no child spans.
    assert not [s for s in exporter.get_finished_spans()
                if s.parent is not None and s.parent.span_id == refused[0].context.span_id]


def test_the_http_gateway_relays_the_trace_context(traced):
    thread, exporter = traced
    exporter.clear()
    body = json.dumps({**REQUEST, "num_images": 1, "steps": 2}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{thread.server.http.port}/v1/generate", data=body, headers={
        "Authorization": f"Bearer {KEYS['alice']}", "traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
    assert wait_for(lambda: any(s.name == "sdserve.request" for s in exporter.get_finished_spans()), timeout=10)
    root = next(s for s in exporter.get_finished_spans() if s.name == "sdserve.request")
    assert f"{root.context.trace_id:032x}" == TRACE_ID and f"{root.parent.span_id:016x}" == PARENT_SPAN


def test_tracing_config_and_the_tracer_factory():
    assert make_tracer("off") is None
    assert make_tracer("console") is not None
    with pytest.raises(InvalidArgument, match="tracing must be"):
        check(config_from_dict({"server": {"tracing": "jaeger"}}))
    with pytest.raises(InvalidArgument, match="otlp_endpoint needs"):
        check(config_from_dict({"server": {"otlp_endpoint": "http://localhost:4317"}}))
    assert ServerConfig().tracing == "off"


def test_tracing_off_imports_no_opentelemetry_and_without_the_extra_on_is_one_line(monkeypatch):
    # The tracing module generation.py and app.py import, in a fresh interpreter (cheap: no torch).
    code = ("import sys, sdserve.server.tracing, sdserve.server.request_log\n"
            "import json; print(json.dumps(sorted(m for m in sys.modules if m.startswith('opentelemetry'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                         timeout=60, check=True).stdout
    assert json.loads(out) == []
    # The extra absent: tracing on fails start-up with what to install.
    for name in [m for m in sys.modules if m.startswith("opentelemetry.sdk")] + ["opentelemetry.sdk"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(InvalidArgument, match=r"sdserve\[otel\]"):
        make_tracer("console")

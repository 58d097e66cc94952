"""Observability (issue 23 item 9): one structured log line per Generate call, whatever its outcome,
and latency histograms labelled by model and backend (tenant only when configured)."""

from __future__ import annotations

import json
import logging
import urllib.request

import grpc
import pytest
from prometheus_client import generate_latest

from sdserve.server.metrics import Metrics
from tests.server.conftest import MODEL, sha, wait_for

REQUEST = {"model": MODEL, "prompt": "a red circle", "steps": 2, "seed": 4}


def _lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "sdserve.requests"]


def _scrape(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()


def test_each_call_logs_one_line_with_its_fields_and_status(server, lora_bytes, caplog):
    from sdserve.server.registry import Quota

    # Named in the registry directly, as a finished upload does (an upload costs a validation worker).
    registry = server.core.registry
    staged = registry.tmp / "alice-observed.part"
    staged.write_bytes(lora_bytes["sd1_a"])
    registry.register("alice", "observed", "lora", "sd1", staged, sha(lora_bytes["sd1_a"]), Quota(100, 1 << 30))
    caplog.set_level(logging.INFO, logger="sdserve.requests")
    with server.client("alice", timeout=60) as client:
        client.generate({**REQUEST, "adapters": [{"name": "observed", "scale": 0.5}]})
        list(client.generate_stream(REQUEST))
        with pytest.raises(grpc.RpcError) as invalid:
            client.generate({**REQUEST, "steps": -1})
        with pytest.raises(grpc.RpcError) as unknown:
            client.generate({**REQUEST, "adapters": [{"name": "nobody-uploaded-this"}]})
    with server.client("bob", timeout=60) as client:
        client.generate({**REQUEST, "steps": 3})
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    # A stream's handler ends just after its last event reaches the caller: its line may trail.
    assert wait_for(lambda: len(_lines(caplog)) >= 5, timeout=10)
    lines = _lines(caplog)
    assert len(lines) == 5, lines  # one per call, never two
    adapter, stream, bad, missing, other = lines
    assert adapter["method"] == "Generate" and stream["method"] == "GenerateStream"
    assert [line["status"] for line in lines] == ["OK", "OK", "INVALID_ARGUMENT", "NOT_FOUND", "OK"]
    assert [line["tenant"] for line in lines] == ["alice"] * 4 + ["bob"]
    assert all(line["model"] == MODEL and line["event"] == "request" for line in lines)
    assert adapter["adapters"] == [sha(lora_bytes["sd1_a"])[:12]] and stream["adapters"] == []
    assert (adapter["steps"], other["steps"]) == (2, 3)
    for line in (adapter, stream, other):
        assert len(line["request_id"]) == 16 and line["backend"] == "eager" and line["variant"] == ""
        assert line["denoise_s"] > 0 and line["decode_s"] > 0 and line["queue_s"] >= 0
        assert line["total_s"] >= line["denoise_s"] + line["decode_s"]
    # Refused in validation (its id is drawn just before) or before it: no phase times, the total measured.
    assert len(bad["request_id"]) == 16 and bad["denoise_s"] is None and bad["queue_s"] is None
    assert bad["steps"] == -1 and bad["total_s"] > 0
    assert missing["request_id"] == "" and missing["adapters"] == [] and missing["total_s"] > 0
    assert all("\n" not in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records if r.name == "sdserve.requests")


def _failing_predict_noise(model, batch):
    raise RuntimeError("the model broke")


def test_an_engine_failure_logs_its_line_with_internal(server, caplog, monkeypatch):
    monkeypatch.setattr(server.server.engine.runner.backend, "predict_noise", _failing_predict_noise)
    caplog.set_level(logging.INFO, logger="sdserve.requests")
    with server.client("alice", timeout=60) as client, pytest.raises(grpc.RpcError) as failed:
        client.generate(REQUEST)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    (line,) = _lines(caplog)
    assert line["status"] == "INTERNAL" and line["tenant"] == "alice" and len(line["request_id"]) == 16
    assert line["queue_s"] is not None and line["denoise_s"] is None  # reached the engine, no result


def test_latency_histograms_are_labelled_by_model_and_backend_not_tenant(server):
    with server.client("alice", timeout=60) as client:
        client.generate(REQUEST)
    text = _scrape(server)
    for name in ("sdserve_request_duration_seconds_count", "sdserve_queue_duration_seconds_count"):
        (line,) = [x for x in text.splitlines() if x.startswith(name + "{")]
        assert line.startswith(f'{name}{{backend="eager",model="{MODEL}"}} '), line
        assert float(line.split()[-1]) >= 1
    assert "tenant=" not in text  # off by default: a reader learns no tenant names


def test_tenant_labels_switch_on_the_latency_histograms():
    for tenant_labels in (False, True):
        metrics = Metrics(tenant_labels=tenant_labels)
        metrics.served("m", "fused", "acme", 0.5, 2.0)
        text = generate_latest(metrics.registry).decode()
        labels = 'backend="fused",model="m",tenant="acme"' if tenant_labels else 'backend="fused",model="m"'
        assert f"sdserve_request_duration_seconds_count{{{labels}}} 1.0" in text
        assert f"sdserve_request_duration_seconds_sum{{{labels}}} 2.0" in text
        assert f"sdserve_queue_duration_seconds_sum{{{labels}}} 0.5" in text
        assert ("acme" in text) == tenant_labels


def test_a_stream_its_caller_cancels_logs_cancelled(server, caplog):
    caplog.set_level(logging.INFO, logger="sdserve.requests")
    with server.client("bob", timeout=60) as client:
        call = client.generate_stream({**REQUEST, "steps": 40})
        next(call)  # queued: the request is admitted
        call.cancel()
    assert wait_for(lambda: len(_lines(caplog)) >= 1, timeout=10)
    assert server.wait_engine_empty(timeout=20)  # the cancel reached the engine too
    (line,) = _lines(caplog)
    assert line["status"] == "CANCELLED" and line["method"] == "GenerateStream" and line["tenant"] == "bob"
    assert line["steps"] == 40 and len(line["request_id"]) == 16 and line["decode_s"] is None

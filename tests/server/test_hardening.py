"""Hostile tenants and faults against a live server (issue: hardening items 2, 4 and 6).

Each test reproduces a failure the server once had: a deleted adapter's failed load poisoning
its digest for every tenant, unread responses piling up outside any bound, malformed messages
answered UNKNOWN with a traceback, drained requests told CANCELLED, metrics open to anyone.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from sdserve.api.convert import pb_from_dict, stubs
from sdserve.server.config import AdmissionConfig, ServerConfig
from tests.server.conftest import KEYS, MODEL, ServerThread, make_config, sha, wait_for

SMALL = {"model": MODEL, "prompt": "a red circle", "steps": 2}  # 32x32 with CFG: 2 rows
SMALL_COST = 32 * 32 * 2 * 2


def _auth(tenant: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {KEYS[tenant]}")]


@pytest.fixture
def fresh_server(tmp_path):
    servers = []

    def start(**sections) -> ServerThread:
        thread = ServerThread(make_config(tmp_path / f"data{len(servers)}", **sections)).start()
        servers.append(thread)
        return thread

    yield start
    for thread in servers:
        thread.stop()


# -- item 2: a failed load is that attempt's alone; files of admitted requests stay pinned ----------


def test_delete_while_queued_neither_fails_the_request_nor_poisons_the_digest(fresh_server, lora_bytes):
    server = fresh_server()
    data = lora_bytes["sd1_a"]
    with server.client("alice") as alice, server.client("bob") as bob:
        alice.upload_adapter(data, name="alice-style", family="sd1")
        # Hold the engine's adapter loader so alice's request is admitted but its file not yet read.
        gate = threading.Event()
        server.server.engine._loader.submit(gate.wait, 30)
        request = {**SMALL, "adapters": [{"name": "alice-style", "scale": 1.0}]}
        future = alice.generate_future(pb_from_dict(request), timeout=60)
        assert wait_for(lambda: len(server.server.engine._waiting) == 1), "the request never waited for its load"
        alice.delete_adapter("alice-style")  # the name goes at once; the file is pinned by the call
        gate.set()
        response = future.result()  # used to fail: "adapter 'alice-style': file could not be read"
        assert response.images and response.adapters[0].sha256 == sha(data)
        assert not server.server.core.registry.blob_path(sha(data)).exists(), "the unpinned file must go"

        # Another tenant brings the same bytes under its own name: its request loads them afresh.
        bob.upload_adapter(data, name="bobs-own", family="sd1")
        response = bob.generate({**SMALL, "adapters": [{"name": "bobs-own", "scale": 1.0}]}, timeout=60)
        assert response.adapters[0].name == "bobs-own"


# -- item 4: unread responses count against their tenant until delivered ----------------------------


def _unread_stream(target: str, request: dict, tenant: str):
    """A GenerateStream call whose client never reads: a 1-byte flow-control window, no growth."""
    channel = grpc.insecure_channel(target, options=[("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0)])
    call = stubs(channel).generation.GenerateStream(pb_from_dict(request), metadata=_auth(tenant), timeout=60)
    return channel, call


def test_unread_responses_stay_counted_until_the_call_ends(fresh_server):
    # alice may have two small requests pending; the server as a whole many more.
    server = fresh_server(admission=AdmissionConfig(64 * SMALL_COST, 2 * SMALL_COST, 64 * SMALL_COST))
    engine = server.server.engine
    opened = [_unread_stream(server.target, {**SMALL, "seed": i}, "alice") for i in range(2)]
    try:
        assert wait_for(lambda: server.on_loop(lambda: server.core.admission.pending_cost) == 2 * SMALL_COST)
        assert wait_for(lambda: engine.idle and server.on_loop(lambda: server.core.admission.running) == 0), \
            "the two requests never finished computing"
        time.sleep(0.3)
        with server.client("alice") as alice, server.client("bob") as bob:
            # Their images are made but nobody read them: alice's share is still taken.
            with pytest.raises(grpc.RpcError) as refused:
                alice.generate({**SMALL, "seed": 9}, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tenant" in refused.value.details()
            assert bob.generate({**SMALL, "seed": 9}, timeout=30).images  # other tenants are unaffected
            for _channel, call in opened:
                call.cancel()
            assert wait_for(lambda: server.on_loop(lambda: server.core.admission.pending_cost) == 0)
            assert alice.generate({**SMALL, "seed": 9}, timeout=30).images
    finally:
        for channel, _call in opened:
            channel.close()


def test_http2_limits_are_set(fresh_server):
    from sdserve.server.app import grpc_options

    options = dict(grpc_options(ServerConfig(max_concurrent_streams=7, max_connection_age_seconds=5)))
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.max_connection_age_ms"] == 5000
    assert options["grpc.keepalive_time_ms"] > 0 and options["grpc.max_connection_idle_ms"] > 0


# -- item 6: malformed messages, drain cut-off, whole-bound requests, leaks, metrics, keys -----------


def _raw_call(target: str, method: str, payload: bytes, metadata=None):
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as failed:
            call(payload, metadata=metadata, timeout=10)
    return failed.value


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xff\xff\xff", b"\x12\x02\xff\xfe"],  # not protobuf; field 2 (prompt) with invalid UTF-8
    ids=["garbage", "invalid-utf8"],
)
def test_malformed_request_is_invalid_argument_after_authentication(server, payload, caplog):
    method = "/sdserve.v1.ImageGeneration/Generate"
    error = _raw_call(server.target, method, payload, metadata=_auth("alice"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "GenerateRequest" in error.details() and "Error" not in error.details()
    unauthenticated = _raw_call(server.target, method, payload, metadata=[("authorization", "Bearer nope")])
    assert unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED
    listing = _raw_call(server.target, "/sdserve.v1.Adapters/ListAdapters", b"\xff\xff", metadata=_auth("alice"))
    assert listing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info], "no traceback is logged for a client's bad bytes"


def test_requests_cut_off_by_the_drain_grace_are_unavailable(fresh_server):
    busy = {"model": MODEL, "prompt": "a blue square", "steps": 200, "width": 64, "height": 64}
    server = fresh_server(admission=AdmissionConfig(10**9, 10**9, 64 * 64 * 200 * 2))  # one runs, one queues
    with server.client("alice") as alice:
        running = alice.generate_future(pb_from_dict(busy), timeout=60)
        queued = alice.generate_future(pb_from_dict({**busy, "seed": 3}), timeout=60)
        assert wait_for(lambda: server.on_loop(lambda: server.core.admission.queued) == 1)
        server.call(server.server.drain(grace=0.2))
        for future in (running, queued):
            with pytest.raises(grpc.RpcError) as cut:
                future.result()
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value.details()
            assert "retry" in cut.value.details()


def test_a_request_larger_than_the_tenants_whole_bound_is_not_told_to_retry(fresh_server):
    server = fresh_server(admission=AdmissionConfig(64 * SMALL_COST, 2 * SMALL_COST, 64 * SMALL_COST))
    with server.client("alice") as alice, pytest.raises(grpc.RpcError) as refused:
        alice.generate({**SMALL, "steps": 20}, timeout=30)  # 10x the tenant's bound
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "never" in refused.value.details()


def test_capacity_refusals_do_not_reveal_other_tenants_load(fresh_server):
    busy = {"model": MODEL, "prompt": "a blue square", "steps": 200, "width": 64, "height": 64}
    busy_cost = 64 * 64 * 200 * 2
    server = fresh_server(admission=AdmissionConfig(busy_cost + SMALL_COST, busy_cost, busy_cost + SMALL_COST))
    with server.client("bob") as bob, server.client("alice") as alice:
        running = bob.generate_future(pb_from_dict(busy), timeout=60)
        assert wait_for(lambda: server.on_loop(lambda: server.core.admission.pending_cost) == busy_cost)
        with pytest.raises(grpc.RpcError) as refused:
            alice.generate({**SMALL, "steps": 4}, timeout=30)  # twice the room bob leaves
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in refused.value.details()
        assert str(busy_cost) not in refused.value.details() and not any(c.isdigit() for c in refused.value.details())
        running.cancel()


def test_metrics_bind_locally_need_a_token_and_name_no_tenant(fresh_server):
    token = "scrape-token-for-this-test"
    server = fresh_server(server=ServerConfig(
        host="127.0.0.1", port=0, metrics_port=0, metrics_token_sha256=hashlib.sha256(token.encode()).hexdigest()
    ))
    assert ServerConfig().metrics_host == "127.0.0.1"
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as unauthorized:
        urllib.request.urlopen(url, timeout=5)
    assert unauthorized.value.code == 401
    server.on_loop(lambda: server.core.metrics.refused_by("alice"))
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    text = urllib.request.urlopen(request, timeout=5).read().decode()
    assert "sdserve_admission_refused_total" in text
    assert "alice" not in text and "tenant=" not in text


def test_keys_new_prints_a_strong_key_and_its_hash():
    def run() -> dict:
        out = subprocess.run([sys.executable, "-m", "sdserve.cli.main", "keys", "new", "--json"],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    first, second = run(), run()
    assert first["key"] != second["key"]
    assert len(first["key"]) >= 40  # 32 random bytes, base64
    assert hashlib.sha256(first["key"].encode()).hexdigest() == first["key_sha256"]

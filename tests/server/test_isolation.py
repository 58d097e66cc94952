"""Tenancy: keys -> tenants, adapters scoped per tenant, admin-only calls."""

from __future__ import annotations

import grpc
import pytest

from sdserve.client import Client
from tests.server.conftest import MODEL


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@pytest.fixture(scope="module")
def bobs_secret(server, lora_bytes):
    bob = server.client("bob")
    bob.upload_adapter(lora_bytes["sd1_b"], name="bobs-secret", family="sd1")
    return "bobs-secret"


def test_missing_or_bad_key_is_unauthenticated(server):
    for api_key in (None, "wrong-key"):
        client = Client(server.target, api_key=api_key)
        for call in (
            lambda c=client: c.generate({"model": MODEL, "prompt": "x", "steps": 1}, timeout=10),
            client.list_adapters,
            client.list_models,
            lambda c=client: c.get_adapter("anything"),
        ):
            code, details = _code(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED, details
    # A malformed header is refused too (not treated as anonymous).
    with grpc.insecure_channel(server.target) as channel:
        from sdserve.api import convert

        stub = convert.stubs(channel).models
        code, _ = _code(lambda: stub.ListModels(convert.request_message("ListModelsRequest"),
                                                metadata=[("authorization", "Basic abc")], timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_key(server):
    assert Client(server.target).health() == "SERVING"


def test_other_tenants_adapters_are_not_found_as_if_absent(server, bobs_secret):
    alice = server.client("alice")
    missing = _code(lambda: alice.get_adapter("never-uploaded"))
    hidden = _code(lambda: alice.get_adapter(bobs_secret))
    assert hidden[0] == grpc.StatusCode.NOT_FOUND
    # Same message shape: nothing tells alice that bob has such an adapter.
    assert hidden[1].replace(bobs_secret, "X") == missing[1].replace("never-uploaded", "X")
    assert bobs_secret not in {a.name for a in alice.list_adapters().adapters}
    code, details = _code(lambda: alice.delete_adapter(bobs_secret))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = _code(
        lambda: alice.generate({"model": MODEL, "prompt": "x", "steps": 1, "adapters": [{"name": bobs_secret}]}, timeout=10)
    )
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("adapters[0].name:")
    # Bob still has it, untouched.
    assert server.client("bob").get_adapter(bobs_secret).name == bobs_secret


def test_admin_only_calls_are_permission_denied_for_tenants(server, lora_bytes):
    alice = server.client("alice")
    code, details = _code(lambda: alice.upload_adapter(lora_bytes["sd1_a"], name="pub", family="sd1", shared=True))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
    code, _ = _code(lambda: alice.delete_adapter("pub", shared=True))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "pub" not in {a.name for a in server.client("admin").list_adapters().adapters}


def test_tenant_deletes_only_its_own(server, lora_bytes):
    alice, bob = server.client("alice"), server.client("bob")
    alice.upload_adapter(lora_bytes["sd1_a"], name="mine", family="sd1")
    bob.upload_adapter(lora_bytes["sd1_a"], name="mine", family="sd1")  # same bytes: one file, two names
    assert alice.delete_adapter("mine").sha256 == bob.get_adapter("mine").sha256
    assert bob.get_adapter("mine").name == "mine"
    path = server.core.registry.blob_path(bob.get_adapter("mine").sha256)
    assert path.exists()  # still named by bob
    bob.delete_adapter("mine")
    assert not path.exists()  # no name points at it any more

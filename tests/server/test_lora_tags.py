"""<lora:NAME:scale> tags of A1111-syntax prompts, through a real server: resolved within the
caller's tenant as stack entries, refused like them when unknown, text in plain prompts."""

from __future__ import annotations

import grpc
import pytest

from tests.server.conftest import MODEL, max_diff, png_pixels, reference_images, sha

BASE = {"model": MODEL, "seed": 31, "steps": 2, "width": 32, "height": 32}


def _check(response, reference) -> None:
    assert max_diff(png_pixels(response.images[0].png), reference[0]) <= 2


def test_tags_join_the_stack_within_the_callers_tenant(server, reference_engine, lora_bytes, tmp_path):
    from sdserve.server.registry import Quota

    alice, bob = server.client("alice"), server.client("bob")
    local = tmp_path / "ink.safetensors"
    local.write_bytes(lora_bytes["sd1_a"])
    # Named in the registry directly, as a finished upload does (uploads are test_uploads.py's;
    # here one would cost a validation worker process).
    registry = server.core.registry
    staged = registry.tmp / "alice-ink-tag.part"
    staged.write_bytes(lora_bytes["sd1_a"])
    registry.register("alice", "ink-tag", "lora", "sd1", staged, sha(lora_bytes["sd1_a"]), Quota(100, 1 << 30))

    sent = {**BASE, "prompt": "a (red:1.2) circle <lora:ink-tag:0.7>", "prompt_syntax": "a1111"}
    response = alice.generate(sent, timeout=120)
    assert [(u.name, u.sha256) for u in response.adapters] == [("ink-tag", sha(lora_bytes["sd1_a"]))]
    same = {**BASE, "prompt": "a (red:1.2) circle ", "prompt_syntax": "a1111",
            "adapters": [{"path": str(local), "scale": 0.7}]}
    _check(response, reference_images(reference_engine, same))
    without = reference_images(reference_engine, {**same, "adapters": []})
    assert max_diff(png_pixels(response.images[0].png), without[0]) > 2  # the tag's LoRA did something

    # Another tenant's name is not found, with the same message as a stack entry naming it.
    with pytest.raises(grpc.RpcError) as caught:
        bob.generate({**sent}, timeout=60)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "prompt: no adapter named 'ink-tag'"
    with pytest.raises(grpc.RpcError) as entry:
        bob.generate({**BASE, "prompt": "x", "adapters": [{"name": "ink-tag"}]}, timeout=60)
    assert entry.value.code() == grpc.StatusCode.NOT_FOUND
    assert entry.value.details() == "adapters[0].name: no adapter named 'ink-tag'"


def test_tags_in_plain_prompts_are_text(server, reference_engine):
    sent = {**BASE, "prompt": "a red circle <lora:ink-tag:0.7>"}
    response = server.client("alice").generate(sent, timeout=120)
    assert list(response.adapters) == []
    _check(response, reference_images(reference_engine, sent))


@pytest.mark.parametrize("request_fields,field", [
    ({"prompt": "x <lora:a:b>", "prompt_syntax": "a1111"}, "prompt"),
    ({"prompt": "x <hypernet:a:1>", "prompt_syntax": "a1111"}, "prompt"),
    ({"prompt": "x", "prompt_syntax": "wiki"}, "prompt_syntax"),
    ({"prompt": "x", "clip_skip": 0}, "clip_skip"),
    ({"prompt": "x", "clip_skip": 99}, "clip_skip"),
])
def test_bad_syntax_fields_are_invalid_argument_naming_the_field(server, request_fields, field):
    with pytest.raises(grpc.RpcError) as caught:
        server.client("alice").generate({**BASE, **request_fields}, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:"), caught.value.details()


def test_the_servers_default_syntax_decides_for_silent_requests():
    """`[engine] prompt_syntax = "a1111"`: a request that does not say reads its tags; one that
    says "plain" keeps them as text (no server needed: the servicer's own step)."""
    from types import SimpleNamespace

    from sdserve.api.types import AdapterSpec, RequestSpec
    from sdserve.engine import EngineConfig
    from sdserve.server.generation import GenerationService

    for default, asked, tagged in (("a1111", None, True), ("a1111", "plain", False), ("plain", None, False),
                                   ("plain", "a1111", True)):
        # The servicer's constructor also wires uploaded ControlNets / IP-Adapters to the
        # registry and the engine's stores; _lora_tags reads neither.
        engine = SimpleNamespace(config=EngineConfig(prompt_syntax=default), ip_adapters=None,
                                 runner=SimpleNamespace(controlnets=None))
        core = SimpleNamespace(metrics=SimpleNamespace(outcome=None), registry=None, engine=engine)
        spec = RequestSpec(prompt="a cat <lora:ink:0.5>", prompt_syntax=asked, adapters=(AdapterSpec(name="own"),))
        out, tags_from = GenerationService(core)._lora_tags(spec)
        assert tags_from == 1
        if tagged:
            assert out.prompt == "a cat " and out.adapters == (AdapterSpec(name="own"), AdapterSpec(name="ink", scale=0.5))
        else:
            assert out == spec

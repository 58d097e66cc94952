"""Errors carry their cause (issue 23 item 3): a request whose model call raises fails INTERNAL
with the exception's type and message, paths and addresses replaced; the server logs it with
the request's id and the trace; `sdserve client --verbose` prints the chain of causes. A
configured ControlNet or IP-Adapter that fits no served model stops start-up, saying why.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import grpc
import pytest
import safetensors.torch
import torch

from sdserve.client import cause_of
from sdserve.errors import InvalidArgument
from sdserve.models.builtin import builtin_path
from sdserve.server.status import CAUSE_CHARS, cause_chain, short_cause
from tests.server.conftest import KEYS, MODEL, ServerThread, make_config

REQUEST = {"model": MODEL, "prompt": "a red circle", "steps": 2, "seed": 4}
FAULT = "mat1 and mat2 shapes cannot be multiplied (2x4 and 8x16) reading /srv/models/secret/unet.bin at 0x7f3a2b1c00"
SHORT = "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x4 and 8x16) reading <path> at <address>"


def _failing_predict_noise(model, batch):
    try:
        raise KeyError("lora_up")
    except KeyError as exc:
        raise RuntimeError(FAULT) from exc  # the chain the client's --verbose shows


@pytest.fixture
def faulty(server, monkeypatch):
    monkeypatch.setattr(server.server.engine.runner.backend, "predict_noise", _failing_predict_noise)
    return server


def test_short_cause_keeps_type_and_message_and_drops_paths_addresses_and_lines():
    assert short_cause(RuntimeError(FAULT)) == SHORT
    assert short_cause(OSError("no such file: C:\\models\\x.bin; peer 10.0.0.7:50051")) == (
        "OSError: no such file: <path>; peer <address>"
    )
    assert short_cause(ValueError("first line\nTraceback (most recent call last):\n  File ...")) == "ValueError: first line"
    assert short_cause(MemoryError()) == "MemoryError"
    assert len(short_cause(ValueError("x" * 1000))) == len("ValueError: ") + CAUSE_CHARS


def test_cause_chain_follows_causes_and_context_outermost_first():
    try:
        try:
            raise KeyError("lora_up")
        except KeyError as inner:
            raise RuntimeError("/a/b failed") from inner
    except RuntimeError as outer:
        assert cause_chain(outer) == ["RuntimeError: <path> failed", "KeyError: 'lora_up'"]


def test_a_model_failure_is_internal_with_its_cause_and_logged_with_the_trace(faulty, caplog):
    caplog.set_level(logging.ERROR, logger="sdserve.server")
    with faulty.client("alice", timeout=60) as client:
        with pytest.raises(grpc.RpcError) as failed:
            client.generate(REQUEST)
        with pytest.raises(grpc.RpcError) as failed_stream:
            list(client.generate_stream(REQUEST))
    for error in (failed.value, failed_stream.value):
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == f"the model failed on this request: {SHORT}"
        assert "/" not in error.details() and "Traceback" not in error.details()
        assert cause_of(error) == f"{SHORT} <- KeyError: 'lora_up'"
    records = [r for r in caplog.records if "failed" in r.getMessage() and r.exc_info]
    assert len(records) == 2, [r.getMessage() for r in caplog.records]  # once per call, not twice
    assert all("of tenant alice on model tiny-sd1" in r.getMessage() for r in records)
    logged = logging.Formatter().formatException(records[0].exc_info)
    assert "_failing_predict_noise" in logged and "/srv/models/secret/unet.bin" in logged  # the operator sees all


def test_cli_client_verbose_prints_the_causes(faulty, capsys, tmp_path):
    from sdserve.cli.main import main

    argv = ["client", "--target", faulty.target, "--api-key", KEYS["alice"], "generate", "--model", MODEL,
            "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "x.png")]
    for verbose in (False, True):
        with pytest.raises(SystemExit) as exited:
            main(argv + (["--verbose"] if verbose else []))
        err = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 1
        assert err[-1] == f"sdserve: error: INTERNAL: the model failed on this request: {SHORT}"
        causes = [line for line in err if line.startswith("sdserve: cause:")]
        assert causes == ([f"sdserve: cause: {SHORT} <- KeyError: 'lora_up'"] if verbose else [])


def test_a_bad_request_carries_no_cause_trailer(server):
    with server.client("alice", timeout=30) as client, pytest.raises(grpc.RpcError) as refused:
        client.generate({**REQUEST, "steps": -1})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and cause_of(refused.value) is None


# -- a configured ControlNet / IP-Adapter that fits no served model: refused at start-up --------


def _start_fails(config) -> str:
    thread = ServerThread(config)
    try:
        with pytest.raises(InvalidArgument) as refused:
            thread.start()
    finally:
        thread.stop()
    return str(refused.value)


def test_a_controlnet_that_fits_no_served_model_stops_start_up_with_the_reason(tmp_path):
    # Registration reads only config.json: the UNet's widths, and no conditioning channels, so
    # diffusers' default 8x stride against tiny-sd1's 2x VAE.
    unet = json.loads((builtin_path(MODEL) / "unet" / "config.json").read_text())
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text(json.dumps(
        {key: unet[key] for key in ("cross_attention_dim", "block_out_channels")}))
    config = make_config(tmp_path / "data")
    config = replace(config, models=replace(config.models, controlnets={"edges": str(tmp_path / "cn")}))
    message = _start_fails(config)
    assert message.startswith("[models.controlnets] 'edges' fits none of the served models (tiny-sd1: takes control "
                              "images down 8x but the base model's VAE scale is 2x"), message
    assert "\n" not in message


def test_an_ip_adapter_of_another_width_stops_start_up_with_the_reason(tmp_path):
    (tmp_path / "ip" / "image_encoder").mkdir(parents=True)
    safetensors.torch.save_file({"image_proj.proj.weight": torch.zeros(4 * 7, 32),
                                 "ip_adapter.1.to_k_ip.weight": torch.zeros(64, 7)},
                                str(tmp_path / "ip" / "ip_adapter.safetensors"))
    config = make_config(tmp_path / "data")
    config = replace(config, models=replace(config.models, ip_adapters={"face": str(tmp_path / "ip")}))
    assert "[models.ip_adapters] 'face' fits none of the served models (tiny-sd1: was made for another base " \
           "model (cross-attention 7 vs" in _start_fails(config)

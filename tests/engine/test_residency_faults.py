"""A failed adapter load belongs to the attempt that met it, never to the file's digest.

The engine once cached a load failure by digest forever: after a file vanished mid-load, the
same bytes brought back under another name (another tenant's upload) failed until restart, with
an error quoting the first request's adapter name.
"""

from __future__ import annotations

import threading
import time

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.request import AdapterSpec
from sdserve.errors import AdapterError
from tests.engine.lora_cases import write_model_lora

MODEL = "tiny-sd1"


def _request(engine: Engine, name: str, path, request_id: str):
    spec = RequestSpec(model=MODEL, prompt="a red circle", seed=1, steps=2,
                       adapters=(AdapterSpec(name=name, path=str(path), scale=1.0),))
    from dataclasses import replace

    return replace(engine.validate(spec), request_id=request_id)


def test_a_failed_load_is_not_remembered_for_the_same_bytes_under_another_name(tmp_path):
    path = write_model_lora(MODEL, tmp_path, "style", rank=4, alpha=4.0, seed=3)
    data = path.read_bytes()
    engine = Engine(EngineConfig(max_batch_rows=8))
    outcomes: dict[str, object] = {}

    def listener(event) -> None:
        if event.kind in ("done", "error"):
            outcomes[event.request_id] = event.error or event.result

    # The loader thread is held, so the first request's file is digested but not yet read.
    gate = threading.Event()
    engine._loader.submit(gate.wait, 30)
    engine.submit(_request(engine, "alice-style", path, "first"), listener)
    engine.step()
    runtime = engine.models.get(MODEL).adapters
    assert len(runtime.loading) == 1
    path.unlink()  # the file goes while its load waits (an adapter deleted mid-request)
    gate.set()
    (future, _started), = runtime.loading.values()
    future.exception(timeout=30)
    path.write_bytes(data)  # the same bytes are back (another tenant uploads them)
    engine.run_until_idle()
    assert isinstance(outcomes["first"], AdapterError)  # that attempt failed, and says so

    engine.submit(_request(engine, "bobs-own", path, "second"), listener)
    deadline = time.monotonic() + 60
    while "second" not in outcomes and time.monotonic() < deadline:
        engine.run_until_idle()
    second = outcomes["second"]
    assert not isinstance(second, Exception), f"the second request inherited a failure: {second}"
    assert second.images

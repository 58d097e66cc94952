"""The one residency store (engine/store.py): every per-request weight loads once, by digest,
in the background; validation reads no weight; what a request uses stays pinned while it lives."""

from __future__ import annotations

import builtins
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, replace

import numpy as np
import pytest
import safetensors.torch
import torch

from sdserve.adapters.convert import convert_file
from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.config import ResidencyConfig
from sdserve.engine.controlnet import ControlSpec
from sdserve.engine.ip_adapter import IPAdapterSpec
from sdserve.engine.request import AdapterSpec, EmbeddingSpec, HypernetworkSpec
from sdserve.engine.store import WeightKey, WeightStore
from sdserve.errors import AdapterError
from tests.adapters.test_hypernetwork import a1111_hypernetwork
from tests.engine.lora_cases import write_model_lora
from tests.engine.oracle import max_pixel_difference
from tests.engine.test_controlnet import make_controlnet
from tests.engine.test_image_inputs import png, scene
from tests.engine.test_ip_adapter import make_ip_adapter

MODEL = "tiny-sd1"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("store")
    embedding = directory / "toy.safetensors"
    safetensors.torch.save_file({"<toy>": torch.randn(2, 32, generator=torch.Generator().manual_seed(1)) * 3},
                                str(embedding))
    saved, _ = a1111_hypernetwork([32, 64], [1, 2, 1], "relu", False, False)
    torch.save(saved, directory / "hn.pt")
    convert_file(directory / "hn.pt", directory / "hn.safetensors")
    lora = write_model_lora(MODEL, directory, "style", rank=4, alpha=4.0, seed=2)
    return {"embedding": str(embedding), "hypernetwork": str(directory / "hn.safetensors"), "lora": str(lora)}


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _spec(files: dict[str, str], seed: int = 1, with_digests: bool = False, **extra) -> RequestSpec:
    def sha(kind: str) -> str:
        return _sha(files[kind]) if with_digests else ""

    return RequestSpec(
        model=MODEL, prompt="a <toy> on a table", seed=seed, steps=2,
        embeddings=(EmbeddingSpec(path=files["embedding"], sha256=sha("embedding")),),
        hypernetworks=(HypernetworkSpec(path=files["hypernetwork"], strength=0.7, sha256=sha("hypernetwork")),),
        adapters=(AdapterSpec(path=files["lora"], scale=0.8, sha256=sha("lora")),),
        **extra,
    )


class OpenCounter:
    """Counts builtins.open calls per watched path (every thread: the loader's too)."""

    def __init__(self, monkeypatch, watched) -> None:
        self.watched = {os.path.realpath(p) for p in watched}
        self.opens: dict[str, int] = {}
        self.refuse = False
        self.refused: list[str] = []
        original = builtins.open

        def counting(file, *args, **kwargs):
            if isinstance(file, str | os.PathLike):
                path = os.path.realpath(os.fspath(file))
                if self.refuse:
                    self.refused.append(path)
                    raise AssertionError(f"opened {path} while refused")
                if path in self.watched:
                    self.opens[path] = self.opens.get(path, 0) + 1
            return original(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", counting)

    def of(self, path: str) -> int:
        return self.opens.get(os.path.realpath(path), 0)


def test_each_file_is_read_once_over_two_requests(files, monkeypatch):
    engine = Engine(EngineConfig())
    engine.generate([engine.validate(RequestSpec(model=MODEL, prompt="warm-up", seed=1, steps=1))])
    spec = _spec(files, with_digests=True)  # identity from the server's registry: nothing is hashed
    counter = OpenCounter(monkeypatch, files.values())
    first = engine.generate([engine.validate(spec)])[0]
    # The embedding's header once for the first validation (the store did not hold it), then one
    # read of each file by the store's loads.
    assert (counter.of(files["embedding"]), counter.of(files["hypernetwork"]), counter.of(files["lora"])) == (2, 1, 1)
    second = engine.generate([engine.validate(replace(spec, seed=2))])[0]
    assert (counter.of(files["embedding"]), counter.of(files["hypernetwork"]), counter.of(files["lora"])) == (2, 1, 1)
    assert not isinstance(first, Exception) and not isinstance(second, Exception)
    stats = {kind: engine.weights.stats_of(kind, MODEL).loads for kind in ("embedding", "hypernetwork", "lora")}
    assert stats == {"embedding": 1, "hypernetwork": 1, "lora": 1}
    # CLI paths (no digest given): hashed once per file version, then never opened again.
    engine.generate([engine.validate(_spec(files, seed=3))])
    before = dict(counter.opens)
    engine.generate([engine.validate(_spec(files, seed=4))])
    assert counter.opens == before


def test_validation_opens_no_file_the_store_holds(files, monkeypatch, tmp_path):
    engine = Engine(EngineConfig())
    net = make_controlnet(MODEL, tmp_path, 1)
    ip = make_ip_adapter(MODEL, tmp_path, 1)
    extra = dict(controlnets=(ControlSpec(model=str(net), image=png(scene(seed=1))),),
                 ip_adapters=(IPAdapterSpec(model=str(ip), image=png(scene(seed=2)), scale=0.5),))
    for with_digests in (False, True):
        spec = _spec(files, with_digests=with_digests, **extra)
        warm = engine.generate([engine.validate(spec)])[0]
        assert not isinstance(warm, Exception), warm
        counter = OpenCounter(monkeypatch, ())
        counter.refuse = True  # any open() during validation fails the test
        request = engine.validate(replace(spec, seed=5))
        counter.refuse = False
        monkeypatch.undo()
        assert counter.refused == []
        assert [e.token for e in request.embedding_refs] == ["<toy>"]
        assert [h.strength for h in request.hypernetwork_refs] == [0.7]
        assert request.embeddings == () and request.hypernetworks == ()  # loaded at admission, not here
        assert not isinstance(engine.generate([request])[0], Exception)


def test_validation_reads_no_lora_or_hypernetwork_at_all(files, monkeypatch):
    # Cold: LoRA and hypernetwork files are the store's to read, at admission.
    engine = Engine(EngineConfig())
    counter = OpenCounter(monkeypatch, files.values())
    engine.validate(replace(_spec(files), embeddings=(), prompt="a cat"))
    assert counter.opens == {}


def _admit_until(engine: Engine, request_id: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(s.request.request_id == request_id for s in engine.batcher.active()):
        assert time.monotonic() < deadline, "the request was never admitted"
        if not engine.step():
            time.sleep(0.002)


@pytest.mark.parametrize("with_digests", [False, True], ids=["cli-paths", "registry-digests"])
def test_a_file_deleted_while_a_request_is_queued_does_not_fail_it(files, tmp_path, with_digests):
    # Copies: this test deletes them. A host budget of one byte keeps nothing unpinned, so the
    # queued request runs only because its weights stay pinned for it.
    copies = {kind: tmp_path / os.path.basename(path) for kind, path in files.items()}
    for kind, path in copies.items():
        shutil.copyfile(files[kind], path)
    copies = {kind: str(path) for kind, path in copies.items()}
    engine = Engine(EngineConfig(residency=ResidencyConfig(host_budget_bytes=1)))
    outcomes: dict[str, object] = {}

    def listener(event) -> None:
        if event.kind in ("done", "error"):
            outcomes[event.request_id] = event.error or event.result

    spec = _spec(copies, with_digests=with_digests)
    first = replace(engine.validate(spec), request_id="first")
    second = replace(engine.validate(spec), request_id="second")  # validated while the files exist
    engine.submit(first, listener)
    _admit_until(engine, "first")
    engine.submit(second, listener)  # queued: not yet seen by the engine
    for path in copies.values():
        os.unlink(path)
    engine.run_until_idle()
    assert not isinstance(outcomes["first"], Exception), outcomes["first"]
    assert not isinstance(outcomes["second"], Exception), f"the queued request failed: {outcomes['second']}"
    assert max_pixel_difference(np.stack(outcomes["first"].images), np.stack(outcomes["second"].images)) == 0
    # Nothing stays pinned once both are done, and the budget then drops everything.
    assert engine.weights.held() == {}
    # Now the store no longer holds them: a new request fails as the files are gone, by its own name.
    third = replace(spec, embeddings=(EmbeddingSpec(name="mine", path=copies["embedding"], token="<toy>",
                                                    sha256=spec.embeddings[0].sha256),), adapters=())
    try:
        outcome = engine.generate([engine.validate(third)])[0]
    except AdapterError as exc:  # cold, so validation reads the header: gone
        outcome = exc
    assert isinstance(outcome, AdapterError) and "mine" in str(outcome) and str(tmp_path) not in str(outcome)


@dataclass
class Blob:
    nbytes: int


def test_the_host_budget_evicts_least_recently_used_unpinned_entries():
    store = WeightStore(ResidencyConfig(host_budget_bytes=250))  # no executor: loads run in place
    keys = {name: WeightKey("embedding", name, MODEL) for name in "abcd"}

    def put(name: str) -> None:
        assert store.poll(keys[name], lambda: Blob(100), name) == Blob(100)

    put("a")
    put("b")
    store.pin("request-1", keys["a"])
    put("c")  # 300 > 250: the least recently used unpinned entry goes (b; a is pinned)
    assert set(store.held()) == {keys["a"], keys["c"]}
    store.poll(keys["a"], lambda: pytest.fail("a is held"), "a")  # a hit: a is now most recent
    put("d")  # c is the least recently used unpinned entry
    assert set(store.held()) == {keys["a"], keys["d"]}
    assert store.tier_bytes["host"] == 200
    store.pin("request-2", keys["d"])
    put("b")  # everything else pinned: over budget, but nothing pinned is evicted
    assert set(store.held()) == {keys["a"], keys["d"], keys["b"]}
    store.release("request-1")  # a unpinned: the tier shrinks back within budget, LRU first
    assert set(store.held()) == {keys["d"], keys["b"]}
    assert store.stats_of("embedding", MODEL).evictions == 3


def test_a_failed_load_is_an_attempt_not_an_entry():
    store = WeightStore(ResidencyConfig())
    key = WeightKey("hypernetwork", "digest", MODEL)

    def broken():
        raise AdapterError("weights", "file could not be read")

    with pytest.raises(AdapterError) as info:
        store.poll(key, broken, "alice-net")
    assert info.value.adapter_name == "alice-net"
    assert store.peek(key) is None and key not in store.loading
    assert store.poll(key, lambda: Blob(1), "bobs-net") == Blob(1)  # the next attempt loads afresh


def test_controlnet_and_ip_adapter_load_once_and_are_shared(tmp_path, monkeypatch):
    import diffusers

    from sdserve.engine import ip_adapter

    net = make_controlnet(MODEL, tmp_path, 2)
    ip = make_ip_adapter(MODEL, tmp_path, 2)
    engine = Engine(EngineConfig(max_batch_rows=12))
    engine.runner.controlnets.allow_paths = False  # as the server: operator-registered names only
    engine.runner.controlnets.register("edges", net)
    engine.ip_adapters.allow_paths = False
    engine.ip_adapters.register("face", ip)
    built = {"controlnet": 0, "ip_adapter": 0}
    from_pretrained = diffusers.ControlNetModel.from_pretrained.__func__
    weights_init = ip_adapter.IPAdapterWeights.__init__

    def counting_controlnet(cls, *args, **kwargs):
        built["controlnet"] += 1
        return from_pretrained(cls, *args, **kwargs)

    def counting_ip(self, *args, **kwargs):
        built["ip_adapter"] += 1
        weights_init(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.ControlNetModel, "from_pretrained", classmethod(counting_controlnet))
    monkeypatch.setattr(ip_adapter.IPAdapterWeights, "__init__", counting_ip)
    specs = [RequestSpec(model=MODEL, prompt=f"a cat {i}", seed=i, steps=2,
                         controlnets=(ControlSpec(model="edges", image=png(scene(seed=i))),),
                         ip_adapters=(IPAdapterSpec(model="face", image=png(scene(seed=i + 5)), scale=0.6),))
             for i in range(3)]
    together = engine.generate([engine.validate(s) for s in specs])
    again = engine.generate([engine.validate(specs[0])])
    assert all(not isinstance(r, Exception) for r in [*together, *again])
    assert built == {"controlnet": 1, "ip_adapter": 1}
    model = engine.models.get(MODEL)
    (cn_key, cn), = engine.weights.held("controlnet").items()
    (ip_key, ip_weights), = engine.weights.held("ip_adapter").items()
    assert engine.runner.controlnets.get("edges", model.device, model.dtype) is cn
    assert engine.ip_adapters.get("face", model) is ip_weights
    # Keyed by the directory's digest, computed once at registration.
    assert cn_key.digest == engine.runner.controlnets.resolve("edges", "controlnets").digest
    assert ip_key.digest == engine.ip_adapters.resolve("face", "ip_adapters").digest
    assert engine.weights.pins(cn_key) == 0 and engine.weights.pins(ip_key) == 0  # released when done
    assert engine.weights.tier_bytes["model"] > 0


def test_one_scheduler_per_request_and_the_cost_admission_reads(monkeypatch):
    from sdserve.engine import request as request_module
    from sdserve.engine import state as state_module

    built: list[str] = []
    for module in (request_module, state_module):
        original = module.make_scheduler

        def counting(choice, config, original=original):
            built.append(choice.class_name)
            return original(choice, config)

        monkeypatch.setattr(module, "make_scheduler", counting)
    engine = Engine(EngineConfig())
    totals: dict[str, int] = {}
    engine.observers.append(lambda e: totals.setdefault(e.request_id, e.total_steps) if e.kind == "admitted" else None)
    spec = RequestSpec(model=MODEL, prompt="a cat", seed=1, steps=3, scheduler="heun", guidance_scale=5.0,
                       guidance_start=0.0, guidance_end=0.5, init_image=png(scene(seed=1)), strength=0.7)
    request = engine.validate(spec)
    assert built == ["HeunDiscreteScheduler"]
    engine.generate([request])
    assert built == ["HeunDiscreteScheduler"]  # the run took validation's scheduler
    (evaluations,) = totals.values()
    assert request.unet_steps == evaluations == 3  # Heun: 2 × int(3 × 0.7) - 1
    # Two rows per image at the evaluations inside the guidance interval (the activity rule), one after.
    assert request.unet_row_steps == 2 + 1 + 1
    assert request.cost == request.width * request.height * request.unet_row_steps
    engine.generate([request])  # the same request run again needs (and builds) a fresh scheduler
    assert len(built) == 2

"""The shared adapter store (scaleout/store.py) without a cluster: put/fetch round trips on a
`file://` directory and on fsspec's in-process `memory://` filesystem, immutability, refusal of
corrupt objects, the front putting a request's files before it sends it (stand-in Ray handle of
test_dispatch.py) and the replica's rewrite of a request's sources to its checked local copies."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import uuid
from pathlib import Path

import pytest

pytest.importorskip("fsspec", reason="fsspec comes with the ray extra (pip install 'sdserve[ray]')")
pytest.importorskip("ray", reason="ray is an optional extra (pip install 'sdserve[ray]')")

import fsspec  # noqa: E402

from sdserve.engine.request import EmbeddingEntry, HypernetworkEntry, StackEntry  # noqa: E402
from sdserve.errors import Internal, Unavailable  # noqa: E402
from sdserve.scaleout.config import RayConfig  # noqa: E402
from sdserve.scaleout.dispatch import RayDispatcher  # noqa: E402
from sdserve.scaleout.store import AdapterStore, StoreCorrupt, localize, request_files  # noqa: E402
from tests.scaleout.test_dispatch import Handle, done, request, run  # noqa: E402


def blob(tmp_path: Path, content: bytes) -> tuple[Path, str]:
    """A file as the registry holds one: its bytes and their sha256 (computed here by hashlib)."""
    digest = hashlib.sha256(content).hexdigest()
    path = tmp_path / "registry" / digest[:2] / f"{digest}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path, digest


@pytest.fixture(params=["file", "memory"])
def store_url(request, tmp_path) -> str:
    if request.param == "file":
        return (tmp_path / "shared").as_uri()
    # memory:// is one dict per process: a fresh root per test keeps tests apart.
    return f"memory://sdserve-test-{uuid.uuid4().hex}"


def test_put_then_local_round_trips_the_bytes(store_url, tmp_path):
    content = os.urandom(3 * (1 << 20) + 17)  # more than one 1 MiB chunk, not a multiple of it
    path, digest = blob(tmp_path, content)
    store = AdapterStore(store_url)
    assert not store.has(digest)
    assert store.put(path, digest) is True
    assert store.has(digest)
    fs, root = fsspec.core.url_to_fs(store_url)  # the layout the docs promise, read independently
    assert fs.cat_file(f"{root.rstrip('/')}/adapters/{digest[:2]}/{digest}") == content
    assert not [name for name in fs.find(root) if ".part" in name]  # no staging object left

    replica = AdapterStore(store_url)  # another process's view of the same URL
    cache = tmp_path / "cache"
    local = replica.local(digest, cache)
    assert local.parent.parent == cache and local.read_bytes() == content
    before = local.stat().st_mtime_ns
    assert replica.local(digest, cache) == local and local.stat().st_mtime_ns == before  # fetched once
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == [local.name]


def test_put_of_a_present_digest_is_a_no_op(store_url, tmp_path):
    path, digest = blob(tmp_path, b"first bytes")
    store = AdapterStore(store_url)
    assert store.put(path, digest) is True
    fs = store.fs
    target = store.object_path(digest)
    fs.pipe_file(target, b"what a second put must not replace")  # marks the object
    assert store.put(path, digest) is False
    assert fs.cat_file(target) == b"what a second put must not replace"


def test_put_refuses_a_file_that_does_not_hash_to_its_digest(store_url, tmp_path):
    path, _digest = blob(tmp_path, b"real bytes")
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    store = AdapterStore(store_url)
    with pytest.raises(ValueError, match="sha256"):
        store.put(path, wrong)
    assert not store.has(wrong)


def test_a_corrupt_store_object_is_refused_and_leaves_no_cache_file(store_url, tmp_path):
    path, digest = blob(tmp_path, b"the uploaded adapter")
    store = AdapterStore(store_url)
    store.put(path, digest)
    store.fs.pipe_file(store.object_path(digest), b"the uploaded adaptex")  # one byte flipped
    cache = tmp_path / "cache"
    with pytest.raises(StoreCorrupt, match="corrupt") as refused:
        store.local(digest, cache)
    assert str(tmp_path) not in str(refused.value)  # messages leak no paths
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_an_object_the_store_lacks_is_unavailable(store_url, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(Unavailable, match="missing"):
        AdapterStore(store_url).local("ab" * 32, cache)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_digests_outside_the_layout_are_refused(tmp_path):
    store = AdapterStore((tmp_path / "shared").as_uri())
    for bad in ("", "../" + "a" * 61, "A" * 64, "a" * 63):
        with pytest.raises(ValueError):
            store.object_path(bad)


def entries(tmp_path: Path) -> tuple[list[StackEntry], list[EmbeddingEntry], list[HypernetworkEntry], list[bytes]]:
    contents = [b"lora one", b"lora two", b"an embedding", b"a hypernetwork"]
    files = [blob(tmp_path, content) for content in contents]
    loras = [StackEntry(name=f"l{k}", source=str(path), scale=1.0, start=0.0, end=1.0, digest=digest)
             for k, (path, digest) in enumerate(files[:2])]
    embedding = [EmbeddingEntry(name="e", source=str(files[2][0]), token="<e>", digest=files[2][1])]
    hypernetwork = [HypernetworkEntry(name="h", source=str(files[3][0]), strength=0.5, digest=files[3][1])]
    return loras, embedding, hypernetwork, contents


def test_localize_rewrites_every_file_reference_to_the_cache(tmp_path):
    loras, embedding, hypernetwork, contents = entries(tmp_path)
    engine_request = request(loras, embedding)
    engine_request = dataclasses.replace(engine_request, hypernetwork_refs=tuple(hypernetwork))
    store = AdapterStore(f"memory://sdserve-test-{uuid.uuid4().hex}")
    for source, digest in request_files(engine_request):
        store.put(source, digest)
    cache = tmp_path / "replica-cache"
    local = localize(engine_request, store, cache)
    rewritten = (*local.adapters, *local.embedding_refs, *local.hypernetwork_refs)
    assert len(rewritten) == 4
    for entry, content in zip(rewritten, contents):
        assert Path(entry.source).is_relative_to(cache)
        assert Path(entry.source).read_bytes() == content
    # Everything but the sources is the front's request.
    assert [(e.name, e.digest) for e in rewritten] == [
        (e.name, e.digest) for e in (*engine_request.adapters, *engine_request.embedding_refs,
                                     *engine_request.hypernetwork_refs)]
    assert local.adapters[1].scale == loras[1].scale and local.embedding_refs[0].token == "<e>"
    assert local.hypernetwork_refs[0].strength == 0.5
    assert (local.prompt, local.seed, local.request_id) == (engine_request.prompt, engine_request.seed, "r1")


def test_the_front_puts_a_requests_files_before_sending_it(tmp_path):
    loras, embedding, _hypernetwork, contents = entries(tmp_path)
    url = f"memory://sdserve-test-{uuid.uuid4().hex}"
    store_seen: list[list[bool]] = []

    class CheckingHandle(Handle):
        """Records, at each send, whether the request's files were already in the store."""

        def remote(self, sent, remaining):
            checker = AdapterStore(url)
            store_seen.append([checker.has(digest) for _source, digest in request_files(sent)])
            return super().remote(sent, remaining)

    handle = CheckingHandle(["replica-1", done()], ["replica-1", done("r2")])
    dispatcher = RayDispatcher(handle, RayConfig(store_url=url))
    first = request(loras, embedding)
    run(dispatcher, first)
    assert store_seen == [[True, True, True]]
    fs, root = fsspec.core.url_to_fs(url)
    for (_source, digest), content in zip(request_files(first), contents):
        assert fs.cat_file(f"{root.rstrip('/')}/adapters/{digest[:2]}/{digest}") == content
    assert dispatcher.stored == {digest for _source, digest in request_files(first)}

    # A digest put once is not put again by this front, even if its object went away.
    fs.rm(f"{root.rstrip('/')}/adapters", recursive=True)
    run(dispatcher, request(loras, request_id="r2"))
    assert store_seen[1] == [False, False]


def test_a_file_named_without_digest_is_hashed_and_put_by_its_digest(tmp_path):
    path, digest = blob(tmp_path, b"a file the CLI named")
    url = f"memory://sdserve-test-{uuid.uuid4().hex}"
    sent: list = []

    class RecordingHandle(Handle):
        def remote(self, engine_request, remaining):
            sent.append(engine_request)
            return super().remote(engine_request, remaining)

    dispatcher = RayDispatcher(RecordingHandle(["replica-1", done()]),
                               RayConfig(store_url=url))
    unhashed = StackEntry(name="f", source=str(path), scale=1.0, start=0.0, end=1.0)
    run(dispatcher, request([unhashed]))
    assert sent[0].adapters[0].digest == digest
    assert AdapterStore(url).has(digest)


def test_a_failed_put_answers_unavailable_and_is_tried_again(tmp_path):
    path, digest = blob(tmp_path, b"bytes")
    handle = Handle(["replica-1", done("r2")])
    dispatcher = RayDispatcher(handle, RayConfig(store_url=f"memory://sdserve-test-{uuid.uuid4().hex}"))
    missing = StackEntry(name="gone", source=str(tmp_path / "no-such-file"), scale=1.0, start=0.0, end=1.0,
                         digest=digest)
    heard = run(dispatcher, request([missing]))
    assert [event.kind for event in heard] == ["error"] and isinstance(heard[0].error, Unavailable)
    assert "no-such-file" not in str(heard[0].error)
    assert handle.streams == [] and dispatcher.stored == set()  # nothing sent, nothing remembered
    heard = run(dispatcher, request([StackEntry(name="ok", source=str(path), scale=1.0, start=0.0, end=1.0,
                                                digest=digest)], request_id="r2"))
    assert [event.kind for event in heard] == ["done"] and dispatcher.stored == {digest}


def test_an_unreadable_file_named_without_digest_answers_unavailable(tmp_path):
    handle = Handle()
    dispatcher = RayDispatcher(handle, RayConfig(store_url=f"memory://sdserve-test-{uuid.uuid4().hex}"))
    missing = StackEntry(name="gone", source=str(tmp_path / "no-such-file"), scale=1.0, start=0.0, end=1.0)
    heard = run(dispatcher, request([missing]))
    assert [event.kind for event in heard] == ["error"] and isinstance(heard[0].error, Unavailable)
    assert handle.streams == []


def test_a_file_that_does_not_match_its_digest_is_internal(tmp_path):
    path, _digest = blob(tmp_path, b"bytes")
    dispatcher = RayDispatcher(Handle(), RayConfig(store_url=f"memory://sdserve-test-{uuid.uuid4().hex}"))
    lying = StackEntry(name="x", source=str(path), scale=1.0, start=0.0, end=1.0, digest="cd" * 32)
    heard = run(dispatcher, request([lying]))
    assert isinstance(heard[0].error, Internal) and dispatcher.stored == set()


def test_concurrent_requests_share_one_put_and_a_cancelled_one_does_not_stop_it(tmp_path, monkeypatch):
    path, digest = blob(tmp_path, b"shared by two requests")
    store_url = f"memory://sdserve-test-{uuid.uuid4().hex}"
    handle = Handle(["replica-1", done("r2")])
    dispatcher = RayDispatcher(handle, RayConfig(store_url=store_url))
    calls: list[str] = []
    real_put = dispatcher.store.put

    def slow_put(source, put_digest):
        calls.append(put_digest)
        import time
        time.sleep(0.2)  # long enough for the second request to find this put under way
        return real_put(source, put_digest)

    monkeypatch.setattr(dispatcher.store, "put", slow_put)
    entry = StackEntry(name="s", source=str(path), scale=1.0, start=0.0, end=1.0, digest=digest)
    heard: dict[str, list] = {"r1": [], "r2": []}

    async def main():
        dispatcher.submit(request([entry], request_id="r1"), heard["r1"].append)
        dispatcher.submit(request([entry], request_id="r2"), heard["r2"].append)
        await asyncio.sleep(0.05)
        dispatcher.cancel("r1")
        while dispatcher._tasks:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(main(), 10))
    assert calls == [digest]
    assert [event.kind for event in heard["r1"]] == ["error"] and "cancelled" in str(heard["r1"][0].error)
    assert [event.kind for event in heard["r2"]] == ["done"]
    assert dispatcher.stored == {digest} and AdapterStore(store_url).has(digest)


def test_without_a_store_url_nothing_is_put(tmp_path):
    path, digest = blob(tmp_path, b"bytes")
    dispatcher = RayDispatcher(Handle(["replica-1", done()]), RayConfig())
    entry = StackEntry(name="s", source=str(path), scale=1.0, start=0.0, end=1.0, digest=digest)
    assert [event.kind for event in run(dispatcher, request([entry]))] == ["done"]
    assert dispatcher.store is None and dispatcher.stored == set()


@pytest.mark.slow
def test_replicas_serve_uploads_from_a_file_store(tmp_path, reference_engine, lora_bytes):
    """A local Ray instance, one replica whose registry dir is not the front's, a file:// store:
    an uploaded LoRA serves the in-process engine's image from the replica's checked copy of the
    store object; a store object with the wrong bytes under an upload's digest is refused
    (INTERNAL), which only a replica reading the store can notice."""
    import grpc

    from sdserve.scaleout.cluster import deploy, start_ray, undeploy
    from tests.scaleout.test_ray_serve import RayServerThread, _check_same
    from tests.server.conftest import MODEL, make_config, reference_images

    store_url = (tmp_path / "shared-store").as_uri()
    ray_config = RayConfig(replicas=1, cpus_per_replica=1.0, app_name="sdserve-store-test", store_url=store_url)
    front_config = make_config(tmp_path / "front-registry")
    replica_dir = tmp_path / "replica-registry"
    replica_config = dataclasses.replace(front_config, registry=dataclasses.replace(
        front_config.registry, data_dir=str(replica_dir)))
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # the shared machine's load is not ours
    started = start_ray(ray_config, num_cpus=2, object_store_memory=100 * 1024 * 1024,
                        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    front = None
    try:
        handle = deploy(replica_config, ray_config)
        front = RayServerThread(front_config, handle, ray_config).start()
        client = front.client("alice")
        client.upload_adapter(lora_bytes["sd1_a"], name="ink", family="sd1")
        client.upload_adapter(lora_bytes["sd1_b"], name="tint", family="sd1")
        ink, tint = (hashlib.sha256(lora_bytes[key]).hexdigest() for key in ("sd1_a", "sd1_b"))
        store = AdapterStore(store_url)
        # What a replica would fetch for "tint" is another file's bytes: put can only skip it.
        store.fs.makedirs(store.object_path(tint).rsplit("/", 1)[0], exist_ok=True)
        store.fs.pipe_file(store.object_path(tint), lora_bytes["sd1_c"])

        request = {"model": MODEL, "prompt": "a red circle", "seed": 7, "steps": 2,
                   "adapters": [{"name": "ink", "scale": 1.0}]}
        response = client.generate(request, timeout=120)
        local_file = tmp_path / "ink.safetensors"
        local_file.write_bytes(lora_bytes["sd1_a"])
        local = {**request, "adapters": [{"path": str(local_file), "scale": 1.0}]}
        _check_same(response, reference_images(reference_engine, local), request)
        assert store.fs.cat_file(store.object_path(ink)) == lora_bytes["sd1_a"]  # the front put it
        cached = replica_dir / "store-cache" / ink[:2] / f"{ink}.safetensors"
        assert cached.read_bytes() == lora_bytes["sd1_a"]  # the replica read it from the store

        with pytest.raises(grpc.RpcError) as refused:
            client.generate({**request, "adapters": [{"name": "tint", "scale": 1.0}]}, timeout=120)
        assert refused.value.code() == grpc.StatusCode.INTERNAL and "corrupt" in refused.value.details()
        assert not (replica_dir / "store-cache" / tint[:2] / f"{tint}.safetensors").exists()
    finally:
        try:
            if front is not None:
                front.stop()
        finally:
            undeploy(ray_config, started)


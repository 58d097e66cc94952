"""A content-addressed adapter store over an fsspec URL, shared by a front and its replicas.

Without it (`RayConfig.store_url` None) replicas read the adapter files by the front's registry
paths, which only works on one node or a filesystem mounted at the same path everywhere. With
it the front copies each file a request names into `<url>/adapters/<dd>/<digest>` once, before
sending the request, and each replica keeps a local copy of what it has read, fetched once and
checked against its digest:

    front:   AdapterStore(url).put(registry_path, digest)       # only if absent
    replica: localize(request, store, cache_dir)                 # sources -> checked local copies

Objects are immutable: a digest names its bytes, so a put of a present digest is a no-op and a
replica's cached copy never goes stale. Nothing deletes from the store (a registry delete leaves
the object; the bytes are still correct for any other name that has them).

fsspec is imported here: import this module only where a store URL is configured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

from sdserve.engine.request import EngineRequest
from sdserve.errors import Internal, Unavailable

log = logging.getLogger("sdserve.scaleout")

_CHUNK = 1 << 20
_DIGEST = re.compile(r"[0-9a-f]{64}")
# Object stores publish an object whole when its upload completes, and their "move" is a copy
# and a delete: there a put writes the final name directly. Elsewhere (local, NFS, memory, sftp,
# hdfs...) a rename is atomic or cheap, so a put writes a temporary name and moves it.
_WHOLE_ON_CLOSE = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})
# The cached copy keeps the registry's file name (registry.blob_path), so the engine reads the
# same kind of path with or without a store.
_CACHED_SUFFIX = ".safetensors"


class StoreCorrupt(Internal):
    """A store object's bytes do not hash to its digest: every replica would read the same bytes,
    so the request fails (INTERNAL) rather than being retried elsewhere."""


def _check_digest(digest: str) -> None:
    if not _DIGEST.fullmatch(digest):
        # Digests come from the registry; anything else would name a path outside the layout.
        raise ValueError(f"not a sha256 hex digest: {digest!r}")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class AdapterStore:
    """Adapter files by sha256 under one fsspec URL ("file:///shared/sdserve", "s3://bucket/x",
    "memory://sdserve" within one process). Every method blocks: call it from a worker thread."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec

        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        protocol = self.fs.protocol
        protocols = {protocol} if isinstance(protocol, str) else set(protocol)
        self._atomic_put = not (protocols & _WHOLE_ON_CLOSE)

    def object_path(self, digest: str) -> str:
        """The store's name for `digest` (in the filesystem's own path form, without protocol)."""
        _check_digest(digest)
        return f"{self.root}/adapters/{digest[:2]}/{digest}"

    def has(self, digest: str) -> bool:
        return bool(self.fs.exists(self.object_path(digest)))

    def put(self, path: str | os.PathLike[str], digest: str) -> bool:
        """Copy the file at `path` in as `digest` unless the store has it; -> whether it copied.
        The file is hashed first: a wrong digest would hand every replica the wrong bytes."""
        target = self.object_path(digest)
        if self.fs.exists(target):
            return False
        actual = file_sha256(path)
        if actual != digest:
            raise ValueError(f"the file's sha256 is {actual}, not the digest it was put under ({digest})")
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if not self._atomic_put:
            self.fs.put_file(os.fspath(path), target)
            return True
        staging = f"{target}.part-{uuid.uuid4().hex}"
        try:
            self.fs.put_file(os.fspath(path), staging)
            # Two fronts putting one digest at once both rename whole copies of the same bytes.
            self.fs.mv(staging, target)
        except BaseException:
            if self.fs.exists(staging):
                self.fs.rm(staging)
            raise
        return True

    def local(self, digest: str, cache_dir: str | os.PathLike[str]) -> Path:
        """A local copy of `digest` under `cache_dir`, fetched once and checked: a copy whose bytes
        do not hash to `digest` is deleted and refused (StoreCorrupt); an object the store lacks,
        or a store that cannot be read, is Unavailable (the front sends the request elsewhere)."""
        _check_digest(digest)
        cached = Path(cache_dir) / digest[:2] / f"{digest}{_CACHED_SUFFIX}"
        if cached.is_file():  # only ever renamed into place after its check
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Unique per fetch: replicas of one node share the cache dir and may fetch one digest at once.
        partial = cached.with_name(f".{digest}.{os.getpid()}.{uuid.uuid4().hex}.part")
        hasher = hashlib.sha256()
        try:
            try:
                with self.fs.open(self.object_path(digest), "rb") as source, open(partial, "wb") as sink:
                    while chunk := source.read(_CHUNK):
                        hasher.update(chunk)
                        sink.write(chunk)
            except FileNotFoundError:
                log.error("adapter store %s has no object %s", self.url, digest)
                raise Unavailable("an adapter file is missing from the shared adapter store") from None
            except OSError as error:
                log.error("adapter store %s: reading %s failed: %s", self.url, digest, error)
                raise Unavailable("the shared adapter store could not be read") from None
            if hasher.hexdigest() != digest:
                log.error("adapter store %s: object %s hashes to %s", self.url, digest, hasher.hexdigest())
                raise StoreCorrupt("an adapter file in the shared adapter store is corrupt (its sha256 "
                                   "does not match)")
            os.replace(partial, cached)
        finally:
            partial.unlink(missing_ok=True)
        return cached


def request_files(request: EngineRequest) -> list[tuple[str, str]]:
    """(source, digest) of every uploaded file `request` names: its LoRA stack, embeddings and
    hypernetworks. ControlNet and IP-Adapter units name operator-configured model directories,
    which every node has by the same path, like the models themselves."""
    entries = (*request.adapters, *request.embedding_refs, *request.hypernetwork_refs)
    return [(entry.source, entry.digest) for entry in entries]


def with_digests(request: EngineRequest) -> EngineRequest:
    """`request` with a digest for every file reference: the server's registry gives each one,
    so this hashes only files named without (a request built by hand). Blocks."""

    def filled(entries: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(entry if entry.digest else dataclasses.replace(entry, digest=file_sha256(entry.source))
                     for entry in entries)

    return dataclasses.replace(request, adapters=filled(request.adapters),
                               embedding_refs=filled(request.embedding_refs),
                               hypernetwork_refs=filled(request.hypernetwork_refs))


def localize(request: EngineRequest, store: AdapterStore, cache_dir: str | os.PathLike[str]) -> EngineRequest:
    """`request` with every file reference's `source` replaced by the local, checked copy of its
    digest (fetched into `cache_dir` if not there yet). Blocks: run it in a worker thread."""

    def local_entries(entries: tuple[Any, ...]) -> tuple[Any, ...]:
        for entry in entries:
            if not entry.digest:
                # The front fills in every digest before it puts (with_digests, dispatch.py).
                raise Internal(f"{entry.name!r} reached a replica without its digest")
        return tuple(dataclasses.replace(entry, source=str(store.local(entry.digest, cache_dir)))
                     for entry in entries)

    return dataclasses.replace(
        request,
        adapters=local_entries(request.adapters),
        embedding_refs=local_entries(request.embedding_refs),
        hypernetwork_refs=local_entries(request.hypernetwork_refs),
    )

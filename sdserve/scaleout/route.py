"""The key requests are routed by: which per-request weights a replica must hold to run them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from sdserve.engine.request import EngineRequest


def stack_key(request: EngineRequest) -> str:
    """A short id for the set of adapter files `request` reads ("" when it reads none).

    Built from content digests (the registry's sha256), not names: two tenants' uploads of the
    same file share a key, since a replica holding one holds the other. Order and scales do not
    matter to residency, so they are left out. Files without a known digest (only the CLI's own
    paths; the server always knows them) key by path.
    """
    return key_of_digests(
        {entry.digest or entry.source for entry in request.adapters}
        | {entry.digest or entry.source for entry in request.embedding_refs}
        | {entry.digest or entry.source for entry in request.hypernetwork_refs}
    )


def key_of_digests(digests: Iterable[str]) -> str:
    """The stack key of a set of file digests: sha256 of the sorted digests, 32 hex ("" if none)."""
    ordered = sorted(set(digests))
    if not ordered:
        return ""
    return hashlib.sha256("\n".join(ordered).encode()).hexdigest()[:32]

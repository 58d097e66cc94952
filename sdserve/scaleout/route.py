"""The key requests are routed by: which per-request weights a replica must hold to run them."""

from __future__ import annotations

import hashlib

from sdserve.engine.request import EngineRequest


def stack_key(request: EngineRequest) -> str:
    """A short id for the set of adapter files `request` reads ("" when it reads none).

    Built from content digests (the registry's sha256), not names: two tenants' uploads of the
    same file share a key, since a replica holding one holds the other. Order and scales do not
    matter to residency, so they are left out. Files without a known digest (only the CLI's own
    paths; the server always knows them) key by path.
    """
    digests = sorted(
        {entry.digest or entry.source for entry in request.adapters}
        | {entry.digest or entry.source for entry in request.embedding_refs}
        | {entry.digest or entry.source for entry in request.hypernetwork_refs}
    )
    if not digests:
        return ""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:32]

"""Identity travels: the registry's sha256 goes with the file to the engine, which never hashes
a file that arrived named by its digest (CLI paths are hashed once per file version)."""

from __future__ import annotations

from sdserve.engine import residency
from tests.server.conftest import MODEL, sha


def test_the_engine_does_not_rehash_registry_files(server, lora_bytes, monkeypatch):
    hashed: list[str] = []
    original = residency._DigestCache.digest

    def counting(self, path: str, label: str) -> str:
        hashed.append(label)
        return original(self, path, label)

    monkeypatch.setattr(residency._DigestCache, "digest", counting)
    data = lora_bytes["sd1_b"]
    with server.client("alice") as alice:
        alice.upload_adapter(data, name="identity-check", family="sd1")
        response = alice.generate({"model": MODEL, "prompt": "a cat", "steps": 2,
                                   "adapters": [{"name": "identity-check", "scale": 0.5}]}, timeout=60)
    assert response.adapters[0].sha256 == sha(data)
    assert hashed == [], f"the engine hashed {hashed}"

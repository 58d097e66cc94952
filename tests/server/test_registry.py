"""The registry on its own: scoping, content addressing, and crash safety."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sdserve.errors import NotFound, ResourceExhausted
from sdserve.server.registry import SHARED, Quota, Registry

QUOTA = Quota(max_adapters=100, max_bytes=1 << 30)


def _stage(registry: Registry, data: bytes) -> tuple[Path, str]:
    """Write `data` as a staged upload the way the servicer does (kept after the context)."""
    path = registry.tmp / f"upload-{hashlib.md5(data).hexdigest()}.part"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_scopes_and_content_addressing(tmp_path):
    registry = Registry(tmp_path)
    staged, digest = _stage(registry, b"one")
    registry.register("alice", "x", "lora", "sd1", staged, digest, QUOTA)
    staged, _ = _stage(registry, b"one")
    registry.register("bob", "x", "lora", "sd1", staged, digest, QUOTA)  # same bytes, one file
    assert [p.name for p in registry.files()] == [f"{digest}.safetensors"]
    assert registry.resolve("alice", "x").scope == "alice"
    with pytest.raises(NotFound):
        registry.resolve("carol", "x")
    staged, shared_digest = _stage(registry, b"shared")
    registry.register(SHARED, "s", "lora", "sd1", staged, shared_digest, QUOTA)
    assert registry.resolve("carol", "s").shared
    assert [(r.scope, r.name) for r in registry.list("alice")] == [("alice", "x"), (SHARED, "s")]
    registry.delete("alice", "x")
    assert registry.blob_path(digest).exists()  # bob still names it
    registry.delete("bob", "x")
    assert not registry.blob_path(digest).exists()
    with pytest.raises(ResourceExhausted):
        staged, d = _stage(registry, b"toolarge")
        registry.register("alice", "y", "lora", "sd1", staged, d, Quota(1, 4))
    assert registry.list("alice") == [registry.resolve("alice", "s")]


# The table as servers wrote it before AdapterInfo had form, rank and targets.
OLD_SCHEMA = """
CREATE TABLE adapters (
    scope   TEXT NOT NULL,
    name    TEXT NOT NULL,
    kind    TEXT NOT NULL,
    family  TEXT NOT NULL,
    sha256  TEXT NOT NULL,
    size    INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (scope, name)
)
"""


def write_old_registry(root: Path, rows: list[tuple[str, str, str, str, bytes, float]]) -> None:
    """A data directory as an older server left it: (scope, name, kind, family, file bytes, created)."""
    root.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(root / "registry.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(OLD_SCHEMA)
    for scope, name, kind, family, data, created in rows:
        digest = hashlib.sha256(data).hexdigest()
        blob = root / "adapters" / digest[:2] / f"{digest}.safetensors"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        db.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (scope, name, kind, family, digest, len(data), created))
    db.close()


def test_form_rank_targets_are_kept_and_old_rows_still_list(tmp_path):
    write_old_registry(tmp_path, [("alice", "old", "lora", "sd1", b"old bytes", 123.5)])
    registry = Registry(tmp_path)
    (old,) = registry.list("alice")
    assert (old.name, old.kind, old.family, old.size, old.created) == ("old", "lora", "sd1", 9, 123.5)
    assert (old.form, old.rank, old.targets) == ("", 0, 0)
    assert registry.blob_path(old.sha256).read_bytes() == b"old bytes"  # not collected as an orphan
    staged, digest = _stage(registry, b"new")
    made = registry.register("alice", "new", "lora", "sd1", staged, digest, QUOTA, form="loha", rank=8, targets=11)
    assert (made.form, made.rank, made.targets) == ("loha", 8, 11)
    registry.close()
    reopened = Registry(tmp_path)  # a restart: the columns exist now, and the values were kept
    assert [(r.name, r.form, r.rank, r.targets) for r in reopened.list("alice")] == [
        ("new", "loha", 8, 11), ("old", "", 0, 0)
    ]
    assert reopened.resolve("alice", "new") == made


# The table as servers wrote it after `checked` was added and before the slider's scales and start.
SCHEMA_BEFORE_SLIDERS = OLD_SCHEMA.replace(
    "    PRIMARY KEY", "    form TEXT NOT NULL DEFAULT '', rank INTEGER NOT NULL DEFAULT 0,\n"
    "    targets INTEGER NOT NULL DEFAULT 0, checked TEXT NOT NULL DEFAULT '',\n    PRIMARY KEY")


def test_slider_scales_and_start_are_kept_and_older_rows_list_them_empty(tmp_path):
    db = sqlite3.connect(tmp_path / "registry.db", isolation_level=None)
    db.execute(SCHEMA_BEFORE_SLIDERS)
    digest = hashlib.sha256(b"old lora").hexdigest()
    db.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               ("alice", "old", "lora", "sd1", digest, 8, 1.5, "lora", 4, 16, '{"tiny-sd1": ""}'))
    db.close()
    (tmp_path / "adapters" / digest[:2]).mkdir(parents=True)
    (tmp_path / "adapters" / digest[:2] / f"{digest}.safetensors").write_bytes(b"old lora")
    registry = Registry(tmp_path)
    (old,) = registry.list("alice")
    assert (old.form, old.rank, old.targets, old.fits) == ("lora", 4, 16, ("tiny-sd1",))  # kept
    assert (old.slider_scales, old.slider_start) == ((), 0.0)
    staged, digest = _stage(registry, b"slider")
    made = registry.register("alice", "size", "lora", "sd1", staged, digest, QUOTA, form="lora", rank=2, targets=8,
                             slider_scales=(-2.0, -1.0, 0.0, 1.0, 2.0), slider_start=0.3)
    assert (made.slider_scales, made.slider_start) == ((-2.0, -1.0, 0.0, 1.0, 2.0), 0.3)
    registry.close()
    reopened = Registry(tmp_path)
    assert reopened.resolve("alice", "size") == made
    assert (reopened.resolve("alice", "old").slider_scales, reopened.resolve("alice", "old").slider_start) == ((), 0.0)
    reopened.close()
    # A damaged value (never written so) lists empty rather than failing the listing.
    db = sqlite3.connect(tmp_path / "registry.db", isolation_level=None)
    db.execute("UPDATE adapters SET slider_scales='[-1, \"x\"]' WHERE name='size'")
    db.close()
    assert Registry(tmp_path).resolve("alice", "size").slider_scales == ()


def test_leftovers_of_a_crash_are_collected_at_start(tmp_path):
    registry = Registry(tmp_path)
    staged, digest = _stage(registry, b"kept")
    registry.register("alice", "kept", "lora", "sd1", staged, digest, QUOTA)
    registry.close()
    # A crash after the rename but before the commit, and one in the middle of an upload.
    orphan = hashlib.sha256(b"orphan").hexdigest()
    (tmp_path / "adapters" / orphan[:2]).mkdir(exist_ok=True)
    (tmp_path / "adapters" / orphan[:2] / f"{orphan}.safetensors").write_bytes(b"orphan")
    (tmp_path / "tmp" / "upload-x.part").write_bytes(b"half")
    registry = Registry(tmp_path)
    assert [p.name for p in registry.files()] == [f"{digest}.safetensors"]
    assert registry.resolve("alice", "kept").sha256 == digest


WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    from sdserve.errors import NotFound
    from sdserve.server.registry import Quota, Registry
    registry = Registry(Path(sys.argv[1]))
    print("ready", flush=True)
    i = 0
    while True:
        data = (f"adapter {i} " * 2000).encode()
        path = registry.tmp / f"upload-{i}.part"
        path.write_bytes(data)
        registry.register("t", f"n{i % 7}", "lora", "sd1", path, hashlib.sha256(data).hexdigest(), Quota(100, 1 << 30))
        if i % 3 == 0:
            try:
                registry.delete("t", f"n{(i + 3) % 7}")
            except NotFound:
                pass
        i += 1
    """
)


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.7])
def test_sigkill_at_any_moment_leaves_a_consistent_registry(tmp_path, delay):
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    registry = Registry(tmp_path)  # start-up collects leftovers
    records = registry.list("t")
    assert records, "the writer registered nothing before the kill"
    for record in records:
        data = registry.blob_path(record.sha256).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record.sha256 and len(data) == record.size
    assert {p.stem for p in registry.files()} == {r.sha256 for r in records}

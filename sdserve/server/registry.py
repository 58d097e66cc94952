"""The adapter registry: content-addressed files on disk and names -> digests in SQLite.

Layout under the data directory:

    adapters/<first two hex>/<sha256>.safetensors   immutable files, named by their digest
    tmp/                                            uploads being received
    registry.db                                     SQLite (WAL): (scope, name) -> digest
    unpacked/<sha256>/                              a packed ControlNet / IP-Adapter's directory,
                                                    written at its first use (server/conditioning.py)

Crash safety comes from the order of operations: a file is complete and fsynced under a
temporary name, renamed to its digest (atomic; the directory is fsynced), and only then named
in one SQLite transaction. A crash before the commit leaves an unnamed file, which `collect`
removes at the next start; a crash after it leaves the new state. Deleting is the reverse:
the name goes in one transaction, then the file (and its unpacked directory) if nothing else
names it. So the names a
client can see always point at complete, validated files.

Pins: a Generate call pins the files its names resolved to (in the same locked step), until the
call ends. Deleting a name while a request that used it is queued or running removes the name
at once but keeps the file until the last pin goes, so the request still finishes.

Scopes: a tenant's own adapters live in the scope of its name; shared (admin-published)
adapters in SHARED, which no tenant name can equal.

What a file is (its form, rank and targets, and a Concept Slider's trained scales and suggested
start: `sdserve.adapters.inspect.Listing`) is read once, at upload, and kept in its row. Databases
written before those columns existed gain them when opened (ALTER TABLE ... ADD COLUMN with the
empty values as defaults), so their rows list with form "", rank and targets 0, no slider scales
and start 0 until re-uploaded.

Which served models a file was validated against, and the verdict for each (fits, or why not), is
kept in its row too (`checked`, JSON {model: reason, "" = fits}): a request that names the adapter
with a model it was found not to fit is refused with that reason before any work. Rows written
before the column existed have no verdicts, and requests with them are checked by the engine alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sdserve.errors import InvalidArgument, NotFound, ResourceExhausted
from sdserve.paths import fsync_dir

SHARED = ""  # the scope of shared adapters; tenant names are never empty
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")

# Columns added after the first schema: (name, declaration), in new tables and added to older
# databases on open (one list for both, so the two cannot drift apart).
_ADDED_COLUMNS = (
    ("form", "TEXT NOT NULL DEFAULT ''"),
    ("rank", "INTEGER NOT NULL DEFAULT 0"),
    ("targets", "INTEGER NOT NULL DEFAULT 0"),
    ("checked", "TEXT NOT NULL DEFAULT ''"),
    ("slider_scales", "TEXT NOT NULL DEFAULT ''"),  # JSON list of numbers; '' for none
    ("slider_start", "REAL NOT NULL DEFAULT 0"),
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS adapters (
    scope   TEXT NOT NULL,
    name    TEXT NOT NULL,
    kind    TEXT NOT NULL,
    family  TEXT NOT NULL,
    sha256  TEXT NOT NULL,
    size    INTEGER NOT NULL,
    created REAL NOT NULL,
{"".join(f"    {name} {declaration},{chr(10)}" for name, declaration in _ADDED_COLUMNS)}    PRIMARY KEY (scope, name)
)
"""
_COLUMNS = "scope, name, kind, family, sha256, size, created, form, rank, targets, checked, slider_scales, slider_start"


@dataclass(frozen=True)
class AdapterRecord:
    scope: str
    name: str
    kind: str
    family: str
    sha256: str
    size: int
    created: float
    form: str = ""  # "lora", "locon", "loha", "lokr" (or a "+" mix) for kind "lora"; "" otherwise or unknown
    rank: int = 0  # the highest module rank for kind "lora"; 0 otherwise or unknown
    targets: int = 0  # modules (lora), vectors (embedding), attention widths (hypernetwork); 0 if unknown
    # The served models the file was validated against at upload: (model, "" if it fits, else why
    # not), sorted by model; () for rows registered before servers recorded it.
    checked: tuple[tuple[str, str], ...] = ()
    # A Concept Slider's trained scales as its file lists them, and its suggested start (fraction of
    # the schedule); () and 0 for other files and for rows registered before servers recorded them.
    slider_scales: tuple[float, ...] = ()
    slider_start: float = 0.0

    @property
    def shared(self) -> bool:
        return self.scope == SHARED

    @property
    def fits(self) -> tuple[str, ...]:
        """The models the file was checked against and fits."""
        return tuple(model for model, reason in self.checked if not reason)

    def misfit(self, model: str) -> str | None:
        """Why the file does not fit `model`; None if it fits or was not checked against it."""
        return next((reason or None for checked, reason in self.checked if checked == model), None)


def _record(row: tuple) -> AdapterRecord:
    *columns, checked, slider_scales, slider_start = row
    verdicts = _json(checked, {})
    pairs = tuple(sorted((str(m), str(r)) for m, r in verdicts.items())) if isinstance(verdicts, dict) else ()
    scales = _json(slider_scales, [])
    numbers = isinstance(scales, list) and all(isinstance(s, int | float) and not isinstance(s, bool) for s in scales)
    return AdapterRecord(*columns, checked=pairs, slider_scales=tuple(map(float, scales)) if numbers else (),
                         slider_start=float(slider_start))


def _json(text: str, empty: object) -> object:
    """A JSON column's value; `empty` for '' (not recorded) and for a damaged value (never written
    so: such a row lists the empty value rather than failing)."""
    try:
        return json.loads(text) if text else empty
    except ValueError:
        return empty


@dataclass(frozen=True)
class Quota:
    max_adapters: int
    max_bytes: int


def check_name(name: str, field: str = "name") -> None:
    if not ADAPTER_NAME.match(name or "") or ".." in name:
        raise InvalidArgument(
            "must be 1 to 64 letters, digits, '_', '-' or '.' (not first), without path characters", field=field
        )


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "adapters"
        self.tmp = self.root / "tmp"
        self.unpacked = self.root / "unpacked"
        for directory in (self.root, self.blobs, self.tmp, self.unpacked):
            directory.mkdir(parents=True, exist_ok=True)
        # One connection shared by the worker threads that call us, behind one lock: the
        # registry's operations are few and short, and the lock also orders file moves with
        # the transactions that name them.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "registry.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._add_missing_columns()
        self._pins: Counter[str] = Counter()  # sha256 -> calls using the file now
        self.collect()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _add_missing_columns(self) -> None:
        """Bring a database written by an older server up to this schema; its rows keep their values
        and read the added columns' defaults."""
        # Read and altered in one write transaction: two servers opening one old database add each
        # column once.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            present = {row[1] for row in self._db.execute("PRAGMA table_info(adapters)")}
            for name, declaration in _ADDED_COLUMNS:
                if name in present:
                    continue
                self._db.execute(f"ALTER TABLE adapters ADD COLUMN {name} {declaration}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # -- reading ---------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / f"{sha256}.safetensors"

    def unpacked_path(self, sha256: str) -> Path:
        """Where a packed ControlNet / IP-Adapter file's directory is written (server/conditioning.py);
        removed with the file."""
        return self.unpacked / sha256

    def _row(self, scope: str, name: str) -> AdapterRecord | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM adapters WHERE scope=? AND name=?",
            (scope, name),
        ).fetchone()
        return _record(row) if row else None

    def resolve(self, tenant: str, name: str, field: str = "name", pin: bool = False) -> AdapterRecord:
        """The tenant's own adapter of that name, else the shared one; NotFound otherwise, with the
        same message whether or not another tenant has one of that name. With `pin`, its file
        stays on disk until `unpin(record.sha256)`, whatever happens to the name meanwhile."""
        with self._lock:
            record = self._row(tenant, name) or self._row(SHARED, name)
            if record is not None and pin:
                self._pins[record.sha256] += 1
        if record is None:
            raise NotFound(f"no adapter named {name[:64]!r}", field=field)
        return record

    def unpin(self, sha256: str) -> None:
        """One pin of `resolve(..., pin=True)` ends; the file goes if it was the last use of it."""
        with self._lock:
            self._pins[sha256] -= 1
            if self._pins[sha256] <= 0:
                del self._pins[sha256]
                self._drop_if_unreferenced(sha256)

    def list(self, tenant: str, family: str = "") -> list[AdapterRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM adapters"
                " WHERE (scope=? OR scope=?) AND (?='' OR family=?) ORDER BY scope=? DESC, name",
                (tenant, SHARED, family, family, tenant),
            ).fetchall()
        return [_record(row) for row in rows]

    def usage(self, scope: str) -> tuple[int, int]:
        """(number of adapters, bytes) registered in `scope`."""
        with self._lock:
            return self._usage(scope)

    def _usage(self, scope: str, excluding: str | None = None) -> tuple[int, int]:
        count, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM adapters WHERE scope=? AND name IS NOT ?",
            (scope, excluding),
        ).fetchone()
        return int(count), int(size)

    def check_quota(self, scope: str, name: str, size: int, quota: Quota) -> None:
        with self._lock:
            self._check_quota(scope, name, size, quota)

    def _check_quota(self, scope: str, name: str, size: int, quota: Quota) -> None:
        # Replacing an adapter of the same name frees its own count and bytes first.
        count, used = self._usage(scope, excluding=name)
        if count + 1 > quota.max_adapters:
            raise ResourceExhausted(f"adapter quota reached ({quota.max_adapters} adapters)", field="name")
        if used + size > quota.max_bytes:
            raise ResourceExhausted(
                f"adapter storage quota reached ({used} of {quota.max_bytes} bytes used, the file has {size})",
                field="data",
            )

    # -- writing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def staging_file(self) -> Iterator[tuple[Path, object]]:
        """A temporary file to receive an upload into; removed unless `register` moved it."""
        fd, name = _mkstemp(self.tmp)
        path = Path(name)
        handle = os.fdopen(fd, "wb")
        try:
            yield path, handle
        finally:
            handle.close()
            path.unlink(missing_ok=True)

    def register(
        self, scope: str, name: str, kind: str, family: str, staged: Path, sha256: str, quota: Quota,
        *, form: str = "", rank: int = 0, targets: int = 0, checked: dict[str, str] | None = None,
        slider_scales: tuple[float, ...] = (), slider_start: float = 0.0,
    ) -> AdapterRecord:
        """Move a complete, validated staged file into the store and name it, atomically; `form`,
        `rank`, `targets`, `slider_scales` and `slider_start` are what the file is, `checked` the
        served models it was validated against with their verdicts (model -> "" if it fits, else
        why not; see AdapterRecord), kept in its row."""
        verdicts = dict(sorted((checked or {}).items()))
        size = staged.stat().st_size
        target = self.blob_path(sha256)
        with open(staged, "rb+") as handle:
            os.fsync(handle.fileno())  # outside the lock: the slow part, and touches no shared state
        with self._lock:
            self._check_quota(scope, name, size, quota)
            target.parent.mkdir(exist_ok=True)
            # Always replace, even when a file of this digest is stored: the staged bytes hash to
            # `sha256`, the stored ones may not any more (truncated or damaged on disk), and an
            # upload of the right bytes must repair the name. Readers holding the old file keep
            # its inode; the rename is atomic.
            os.replace(staged, target)
            fsync_dir(target.parent)
            old = self._row(scope, name)
            record = AdapterRecord(scope, name, kind, family, sha256, size, time.time(), form, rank, targets,
                                   tuple(verdicts.items()), tuple(map(float, slider_scales)), float(slider_start))
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    f"INSERT OR REPLACE INTO adapters ({_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMNS.split(',')))})",
                    (scope, name, kind, family, sha256, size, record.created, form, rank, targets,
                     json.dumps(verdicts) if verdicts else "",
                     json.dumps(record.slider_scales) if record.slider_scales else "", record.slider_start),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._drop_if_unreferenced(sha256)
                raise
            if old is not None and old.sha256 != sha256:
                self._drop_if_unreferenced(old.sha256)
        return record

    def delete(self, scope: str, name: str) -> AdapterRecord:
        with self._lock:
            record = self._row(scope, name)
            if record is None:
                raise NotFound(f"no adapter named {name[:64]!r}", field="name")
            self._db.execute("DELETE FROM adapters WHERE scope=? AND name=?", (scope, name))
            self._drop_if_unreferenced(record.sha256)
        return record

    def _drop_if_unreferenced(self, sha256: str) -> None:
        if self._pins.get(sha256):
            return  # a running call uses the file; its last unpin drops it
        (count,) = self._db.execute("SELECT COUNT(*) FROM adapters WHERE sha256=?", (sha256,)).fetchone()
        if count == 0:
            self.blob_path(sha256).unlink(missing_ok=True)
            shutil.rmtree(self.unpacked_path(sha256), ignore_errors=True)

    def collect(self) -> int:
        """Remove staged leftovers and files no name points to (what a crash can leave behind)."""
        removed = 0
        with self._lock:
            for leftover in self.tmp.iterdir():
                leftover.unlink(missing_ok=True)
                removed += 1
            named = {row[0] for row in self._db.execute("SELECT DISTINCT sha256 FROM adapters")}
            for blob in self.blobs.glob("*/*.safetensors"):
                if blob.stem not in named:
                    blob.unlink(missing_ok=True)
                    removed += 1
            # Unpacked directories of files no name points to, and staging leftovers of an unpack.
            for directory in self.unpacked.iterdir():
                if directory.name not in named:
                    shutil.rmtree(directory, ignore_errors=True)
                    removed += 1
        return removed

    def files(self) -> list[Path]:
        """Every file in the store and the staging area (for tests and audits)."""
        return sorted([*self.blobs.glob("*/*"), *self.tmp.iterdir()])


def _mkstemp(directory: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="upload-", suffix=".part", dir=directory)



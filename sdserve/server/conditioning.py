"""A request's ControlNet and IP-Adapter names -> models, uploaded ones first.

A unit's `model` names, in this order:

1. the caller's tenant's uploaded model of that name (kind "controlnet" / "ip_adapter"),
2. else a shared (admin-published) uploaded one,
3. else the operator's `[models] controlnets` / `ip_adapters` entry of that name.

An uploaded model is a packed file in the registry (`sdserve.adapters.conditioning`). At its first
use the file is unpacked to `<data_dir>/unpacked/<sha256>/` (staged and renamed whole, so
concurrent first uses race harmlessly) and registered with the engine's ControlNet or IP-Adapter
store under the name `NAME@<first 16 hex of sha256>`, the name the unit then carries (and the
image's PNG parameters record). From there it is served like an operator's model: the same fit
checks, loaded, kept and evicted by the engine's residency store keyed by the directory's digest,
so one packed file uploaded under several names or by several tenants is loaded once. The file
is pinned for the call like any adapter file, so a delete during the call keeps the file and its
directory until the call ends; the registry then removes both.

A name of another kind (a tenant's LoRA called like the operator's ControlNet) does not shadow the
operator's model; with no operator model of that name either, the unit is refused naming the kind.
Another tenant's upload is invisible: the name falls through to the operator's, else NOT_FOUND.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from sdserve.adapters import conditioning
from sdserve.api import convert
from sdserve.engine import Engine, RequestSpec
from sdserve.engine.store import DirectoryRegistry
from sdserve.errors import InvalidArgument, NotFound
from sdserve.server.registry import Registry

log = logging.getLogger("sdserve.server")

# What `make_servable` prepares: (engine store, engine name, sha256, kind, name as the request gave it).
Servable = tuple[DirectoryRegistry, str, str, str, str]
# Request field -> the registry kind it names.
CONDITIONING_FIELDS = (("controlnets", conditioning.CONTROLNET), ("ip_adapters", conditioning.IP_ADAPTER))
WHAT = {conditioning.CONTROLNET: "ControlNet", conditioning.IP_ADAPTER: "IP-Adapter"}


class UploadedConditioning:
    """Resolves request units against the registry and makes uploaded models servable."""

    def __init__(self, registry: Registry, engine: Engine) -> None:
        self.registry = registry
        self.stores: dict[str, DirectoryRegistry] = {conditioning.CONTROLNET: engine.runner.controlnets,
                                                     conditioning.IP_ADAPTER: engine.ip_adapters}
        self._lock = threading.Lock()  # one unpack-and-register per engine name at a time
        self._registered: set[str] = set()  # engine names registered by this server

    def resolve(self, tenant: str, spec: RequestSpec, model: str, family: str,
                pinned: list[str]) -> tuple[RequestSpec, list[convert.AdapterUse], list[Servable]]:
        """The spec with every unit that names an uploaded model renamed to its engine name, the
        uploaded models used, and what `make_servable` must prepare before the engine validates
        the spec. Quick (registry look-ups only: call it where the other adapter names resolve,
        so a cancelled call cannot pin a file after its pins were released). Each file used is
        pinned (its digest appended to `pinned`; the caller unpins)."""
        changes: dict[str, tuple] = {}
        used: list[convert.AdapterUse] = []
        pending: list[Servable] = []
        for field_name, kind in CONDITIONING_FIELDS:
            units = getattr(spec, field_name)
            renamed = []
            for index, unit in enumerate(units):
                where = f"{field_name}[{index}].model"
                engine_name = self._uploaded(tenant, unit.model, kind, model, family, where, pinned, used, pending)
                renamed.append(dataclasses.replace(unit, model=engine_name) if engine_name else unit)
            if any(new is not old for new, old in zip(renamed, units)):
                changes[field_name] = tuple(renamed)
        return (dataclasses.replace(spec, **changes) if changes else spec), used, pending

    def make_servable(self, pending: list[Servable]) -> None:
        """Unpack and register what `resolve` found. Blocking (a first use writes the directory):
        call on a worker thread."""
        for item in pending:
            self._servable(*item)

    def _uploaded(self, tenant: str, name: str, kind: str, model: str, family: str, where: str,
                  pinned: list[str], used: list[convert.AdapterUse], pending: list[Servable]) -> str | None:
        """The engine name of the tenant's (else the shared) uploaded model `name` of `kind`; None
        when the operator's model of that name (or the engine's NOT_FOUND) decides."""
        if not name:
            return None  # the engine names the missing field
        store = self.stores[kind]
        try:
            record = self.registry.resolve(tenant, name, field=where, pin=True)
        except NotFound:
            return None
        pinned.append(record.sha256)
        if record.kind != kind:
            if name in store.registered():
                return None  # the operator's model of that name; the upload is another kind
            raise InvalidArgument(f"{name[:64]!r} is registered as kind {record.kind!r}, not {kind!r}", field=where)
        if record.family != family:
            raise InvalidArgument(f"{WHAT[kind]} {name[:64]!r} is for {record.family} models; model {model!r} is "
                                  f"{family}", field=where)
        misfit = record.misfit(model)
        if misfit is not None:  # found at upload
            fits = f"; it fits {', '.join(repr(m) for m in record.fits)}" if record.fits else ""
            raise InvalidArgument(f"{WHAT[kind]} {name[:64]!r} does not fit model {model!r}: {misfit}{fits}",
                                  field=where)
        engine_name = f"{name}@{record.sha256[:16]}"
        pending.append((store, engine_name, record.sha256, kind, name))
        used.append(convert.AdapterUse(name, record.sha256, record.shared, kind))
        return engine_name

    def _servable(self, store: DirectoryRegistry, engine_name: str, sha256: str, kind: str, name: str) -> None:
        """Unpack the file if its directory is not there (first use, or removed with a deleted
        name and uploaded again) and register it with the engine's store under `engine_name`."""
        directory = self.registry.unpacked_path(sha256)
        with self._lock:
            if not directory.is_dir():
                self._unpack(sha256, kind, name, directory)
            if engine_name not in self._registered:
                # Reads the configs and digests the files once; from here the store serves it.
                store.register(engine_name, directory)
                self._registered.add(engine_name)

    def _unpack(self, sha256: str, kind: str, name: str, directory: Path) -> None:
        try:
            conditioning.unpack(self.registry.blob_path(sha256), name, kind, directory)
        except FileExistsError:
            pass  # written meanwhile (another server process on this data directory)
        except OSError as exc:
            if directory.is_dir():
                return  # the rename lost a race to an identical directory
            log.error("could not unpack %s %r (%s): %s", kind, name[:64], sha256[:16], exc)
            raise
        log.info("unpacked %s %r (%s) for serving", kind, name[:64], sha256[:16])

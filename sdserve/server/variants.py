"""Compiled variants of hot stacks: (base model, exact adapter stack) -> a compiled model dir.

A `[[variants]]` entry names a base model (as requests name it) and a directory written by
`sdserve compile fuse` (served by the eager engine on fused weights, backend "fused") or by
`sdserve compile refit` (an ONNX export with the stack in its weights, served by the onnxruntime
backend, backend "onnxruntime"). The stack is read from the directory's own record (a fused
dir's `sdserve.json` `compile` section, an ONNX dir's `sdserve-compile.json` manifest: every
LoRA by sha256 and scale, and the base's digest), never repeated by hand, so a variant can only
claim the stack it was built from. At start-up a variant is refused (one line)
when its record is missing, from another sdserve version, built from another base than the one
it is configured for (weights digest), or has embeddings fused in.

A request is routed to a variant when its stack is *exactly* the variant's:
- the same LoRAs by digest at the same scales, as a multiset: fused weights are
  `W + Σ s·c·B@A`, a sum, so the order of the stack does not matter, while the same file twice
  (a·X + b·X) is not matched to one entry at a+b (equal in exact arithmetic, but a variant claims
  only the stack it records);
- every window covering every step: active at step i of N needs `i/N >= start` at i = 0 and
  `(i+1)/N <= end` at i = N−1, i.e. start == 0 and end == 1, whatever N;
- no embeddings and no hypernetworks (a variant fuses LoRAs only; variants with fused embeddings
  are refused: a per-request embedding's token depends on the name it is used under, so the
  fused tokenizer's token could not be matched to it reliably).
Everything else stays on the eager base and batches with the base's other requests; routed
requests batch among themselves (the batcher groups rows by model). A routed request that the
variant's backend refuses at validation (the onnxruntime backend serves no per-request ControlNet
or IP-Adapter) runs on the eager base instead (`generation.py`), where the base is served eagerly.

A variant is not addressable by its own name: requests reach it only through its base model and
its stack; its name shows in responses (`GenerateResponse.variant`) and metrics. A base model
that is not in `[models] serve` exists only compiled: its weights are never loaded, and a request
for it whose stack matches no variant is refused with INVALID_ARGUMENT naming `adapters`.

The seam for compiled backends: `Variant.backend` comes from the record's kind and
`Variant.engine_model` is what the engine loads (its `ModelStore` picks the backend from the
directory); a directory another backend serves becomes a variant by being read here into the
same `Variant` (TensorRT engines, once the engine serves them, through their manifest the same way).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sdserve import __version__
from sdserve.api.types import RequestSpec
from sdserve.errors import InvalidArgument

METADATA_FILE = "sdserve.json"  # a model dir's own description (`sdserve.models.builtin.METADATA_FILE`)
MANIFEST_FILE = "sdserve-compile.json"  # a compiled dir's manifest (`sdserve.compile.manifest.MANIFEST_FILE`)
BACKENDS = {"fused": "fused", "onnx": "onnxruntime"}  # record kind -> the backend that serves it
EAGER = "eager"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# (sha256, scale) per LoRA, sorted: the order-insensitive multiset a variant is keyed by.
StackKey = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class VariantConfig:
    """One `[[variants]]` entry: a compiled directory serving one exact stack of a model."""

    model: str
    """The base model as requests name it (one of `[models] serve`, or a model served only
    compiled): a built-in name or a directory, the same string fuse's `--model` recorded or any
    name for the same weights (checked by digest)."""
    dir: str
    """The directory `sdserve compile fuse` or `sdserve compile refit` wrote; its own record
    (`sdserve.json`, or the ONNX manifest `sdserve-compile.json`) says the stack."""
    name: str = ""
    """The variant's label in responses and metrics; "" = the directory's name."""


@dataclass(frozen=True)
class Variant:
    """A variant as read and checked at start-up."""

    name: str
    model: str  # the base model's name, as requests give it
    engine_model: str  # what the engine loads and batches by: the compiled directory
    backend: str  # "fused" (the eager engine on fused weights) or "onnxruntime"
    stack: StackKey


def stack_key(spec: RequestSpec) -> StackKey | None:
    """The request's stack as a variant key, or None when no variant can serve it (no LoRA, a
    window short of a step, an embedding or hypernetwork, or a file not known by its digest)."""
    if not spec.adapters or spec.embeddings or spec.hypernetworks:
        return None
    entries = []
    for adapter in spec.adapters:
        start = 0.0 if adapter.start is None else float(adapter.start)
        end = 1.0 if adapter.end is None else float(adapter.end)
        if start != 0.0 or end < 1.0 or not adapter.sha256:
            return None
        entries.append((adapter.sha256, 1.0 if adapter.scale is None else float(adapter.scale)))
    return tuple(sorted(entries))


def _record(directory: Path, where: str) -> dict:
    """The compile record: an ONNX dir's manifest (its LoRAs under `stack`, as `loras` here),
    else a fused dir's `sdserve.json` `compile` section."""
    manifest = directory / MANIFEST_FILE
    source = manifest if manifest.is_file() else directory / METADATA_FILE
    try:
        meta = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InvalidArgument(f"{where}: {directory.name} has no readable {source.name}; give a directory "
                              "written by `sdserve compile fuse` or `sdserve compile refit`") from None
    record = meta if source is manifest else (meta.get("compile") if isinstance(meta, dict) else None)
    if not isinstance(record, dict) or record.get("kind") not in BACKENDS:
        raise InvalidArgument(f"{where}: {directory.name} is not a fused model or an ONNX export "
                              "(no compile record of kind 'fused' or 'onnx')")
    if source is manifest:
        record = {**record, "loras": record.get("stack") or ()}
    if record.get("sdserve_version") != __version__:
        raise InvalidArgument(f"{where}: {directory.name} was compiled by sdserve {record.get('sdserve_version')}, "
                              f"this is {__version__}; compile it again")
    return record


def _recorded_stack(record: dict, name: str, where: str) -> StackKey:
    if record.get("embeddings"):
        raise InvalidArgument(f"{where}: {name} has embeddings fused in; variants route LoRA stacks only "
                              "(fuse the LoRAs alone, or serve the directory as a model of its own)")
    entries = []
    for entry in record.get("loras") or ():
        sha256, scale = entry.get("sha256") if isinstance(entry, dict) else None, None
        if isinstance(entry, dict) and isinstance(entry.get("scale", 1.0), (int, float)):
            scale = float(entry.get("scale", 1.0))
        if not isinstance(sha256, str) or not _SHA256.match(sha256) or scale is None or not math.isfinite(scale):
            raise InvalidArgument(f"{where}: {name}'s compile record has a malformed LoRA entry")
        entries.append((sha256, scale))
    if not entries:
        raise InvalidArgument(f"{where}: {name} records no LoRA; a variant serves a LoRA stack (an ONNX export "
                              "gets one from `sdserve compile refit`; serve a plain export as a model of its own)")
    return tuple(sorted(entries))


def read_variant(config: VariantConfig, base_digest: Callable[[], str], where: str) -> Variant:
    """Read and check one variant; `base_digest()` is the configured base's weights digest (the
    same function fuse recorded it with), called only once the record is otherwise sound."""
    directory = Path(config.dir).expanduser()
    if not directory.is_dir():
        raise InvalidArgument(f"{where}.dir: not a directory")
    directory = directory.resolve()
    name = config.name or directory.name
    record = _record(directory, where)
    stack = _recorded_stack(record, name, where)
    if record.get("base_digest") != base_digest():
        raise InvalidArgument(f"{where}: {name} was fused from another base model than {config.model!r} "
                              f"(recorded base {str(record.get('base'))[:64]!r}; weights digest differs)")
    return Variant(name=name, model=config.model, engine_model=str(directory), backend=BACKENDS[record["kind"]],
                   stack=stack)


def model_digest(path: Path) -> str:
    """The weights digest fuse records as `base_digest` (one function for both sides)."""
    from sdserve.trainers.components import model_digest as digest

    return digest(path)


class VariantRouter:
    """Which variant, if any, serves a request; built once at start-up, read on the event loop."""

    def __init__(self, variants: Iterable[Variant], eager_models: Iterable[str]) -> None:
        self.variants = tuple(variants)
        self._by_key: dict[tuple[str, StackKey], Variant] = {}
        for variant in self.variants:
            key = (variant.model, variant.stack)
            if key in self._by_key:
                raise InvalidArgument(f"[[variants]] {self._by_key[key].name} and {variant.name} serve the same "
                                      f"stack of {variant.model!r}; keep one")
            self._by_key[key] = variant
        eager = set(eager_models)
        self.compiled_only = frozenset(v.model for v in self.variants if v.model not in eager)

    def route(self, model: str, spec: RequestSpec) -> tuple[RequestSpec, Variant | None]:
        """`spec` (adapters resolved to digests) for served model `model` -> the spec to run and
        its variant: a matching variant gets the spec on its directory with the stack dropped
        (it is in the weights); otherwise the spec as given."""
        key = stack_key(spec)
        variant = self._by_key.get((model, key)) if key is not None else None
        if variant is not None:
            return dataclasses.replace(spec, model=variant.engine_model, adapters=()), variant
        if model in self.compiled_only:
            stacks = [v for v in self.variants if v.model == model]
            raise InvalidArgument(
                f"model {model!r} is served only compiled, with fixed adapter stacks ({len(stacks)}); a request "
                "for it must carry exactly one of those stacks (same adapters and scales, full windows, "
                "no embeddings or hypernetworks)", field="adapters")
        return spec, None

    def engine_model(self, model: str) -> str:
        """What the engine holds for served model `model`: the model itself, or, for a model
        served only compiled, its first fused variant's directory (same architecture and LoRA
        targets; an ONNX dir has no modules to name targets by)."""
        if model in self.compiled_only:
            fused = [v.engine_model for v in self.variants if v.model == model and v.backend == "fused"]
            if not fused:
                raise InvalidArgument(f"model {model!r} is served only compiled, by ONNX variants alone: add it to "
                                      "[models] serve or give it a fused variant (uploads are checked against one)")
            return fused[0]
        return model


def load_variants(configs: Iterable[VariantConfig], base_paths: Mapping[str, Path],
                  eager_models: Iterable[str]) -> VariantRouter:
    """Read every configured variant; `base_paths` maps each variant's model name to its
    directory (the engine's `ModelInfo.path`). Digests are computed once per base."""
    digests: dict[str, str] = {}

    def digest_of(model: str) -> Callable[[], str]:
        def compute() -> str:
            if model not in digests:
                digests[model] = model_digest(base_paths[model])
            return digests[model]
        return compute

    variants = [read_variant(c, digest_of(c.model), f"variants[{i}]") for i, c in enumerate(configs)]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise InvalidArgument("[[variants]] names must be unique (set name = ... where directories share a name)")
    return VariantRouter(variants, eager_models)

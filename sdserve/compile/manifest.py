"""What a compiled directory holds, and which sdserve wrote it: `sdserve-compile.json`.

Whatever reads a compiled directory (a runner backend, `compile refit`, `compile check`) reads
this file first and refuses a directory from another sdserve version or with a component file
missing, before it opens any graph. Every component lists its graph file, its weights file, its
inputs and outputs (name, dtype, shape with named dynamic axes), the diffusers config of the
module it came from, how its onnxruntime check went, and its refit map: adapter target
("unet.down_blocks.0...to_q") -> the graph initializer holding that module's weight.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdserve import __version__
from sdserve.errors import InvalidArgument

MANIFEST_FILE = "sdserve-compile.json"
FORMAT = 1  # bumped when the layout of this file changes


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy name: "float32", "float16", "int64"
    shape: tuple[int | str, ...]  # str: a dynamic axis ("batch", "height", ...)


@dataclass(frozen=True)
class Check:
    """onnxruntime against torch on seeded inputs, worst over the checked shapes."""

    max_abs: float
    max_rel: float  # max_abs / max |torch output|
    tolerance: float  # on max_rel
    shapes: tuple[str, ...] = ()  # what was checked, e.g. "batch 2, 16x16 latents"

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance


@dataclass(frozen=True)
class Component:
    name: str  # "unet", "text_encoder", "vae_decoder", "controlnet/canny", ...
    graph: str  # relative path of the .onnx file
    weights: str  # relative path of its external data file
    config: str  # relative path of the source module's config.json
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    dtype: str  # of its float weights
    check: Check
    refit: Mapping[str, str] = field(default_factory=dict)  # adapter target -> initializer name
    overrides: str = ""  # relative path of refit weights (initializer -> value), "" for none


@dataclass(frozen=True)
class Manifest:
    kind: str  # "onnx"
    sdserve_version: str
    base: str  # the model as named on the command line
    base_digest: str  # sha256 over its weight files (trainers.components.model_digest)
    family: str
    opset: int
    fp16: bool
    components: Mapping[str, Component]
    files: tuple[str, ...]  # everything else the directory holds for serving (scheduler, tokenizers, sdserve.json)
    format: int = FORMAT
    stack: tuple[Mapping[str, Any], ...] = ()  # a refit's LoRAs ({file, sha256, scale}), in order
    # A refit's graphs and weights are its base export's, read in place (`graph_dir`): the path of
    # that export relative to this directory, and `export_fingerprint` of it when the refit was written.
    base_export: str = ""
    base_export_fingerprint: str = ""
    # ControlNets exported as `controlnet/NAME`: NAME -> the directory's digest
    # (`engine.store.directory_digest`), so a request naming a ControlNet the server registered
    # is served here only when it is the very one exported.
    controlnets: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


def graph_dir(directory: Path, manifest: Manifest) -> Path:
    """Where the components' graphs and weights files are: the directory itself, or for a refit
    the base export it points at (the refit holds only the changed initializers)."""
    directory = Path(directory)
    return (directory / manifest.base_export).resolve() if manifest.base_export else directory


def export_fingerprint(directory: Path) -> str:
    """sha256 over an export's manifest and graph files (bytes) and each weights file's size and
    modification time. Not over the weights' bytes: hashing an SD UNet's 3.4 GB would cost more
    than the copy a refit saves by reading them in place; a rewrite of a weights file (or a new
    export into the same place) changes its mtime, and with it this fingerprint."""
    import hashlib

    directory = Path(directory)
    digest = hashlib.sha256((directory / MANIFEST_FILE).read_bytes())
    raw = json.loads((directory / MANIFEST_FILE).read_text())
    for name in sorted(raw["components"]):
        entry = raw["components"][name]
        digest.update((directory / entry["graph"]).read_bytes())
        stat = (directory / entry["weights"]).stat()
        digest.update(f"{entry['weights']}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (Path(directory) / MANIFEST_FILE).write_text(manifest.to_json())


def _tensors(entries: list[dict[str, Any]]) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(e["name"], e["dtype"], tuple(e["shape"])) for e in entries)


def _component(raw: dict[str, Any]) -> Component:
    return Component(
        name=raw["name"], graph=raw["graph"], weights=raw["weights"], config=raw["config"],
        inputs=_tensors(raw["inputs"]), outputs=_tensors(raw["outputs"]), dtype=raw["dtype"],
        check=Check(**{**raw["check"], "shapes": tuple(raw["check"].get("shapes", ()))}),
        refit=dict(raw.get("refit", {})), overrides=raw.get("overrides", ""),
    )


def read_manifest(directory: Path, flag: str = "--onnx", *, version: str = __version__) -> Manifest:
    """The manifest of a compiled directory, refused (one line naming `flag`) when it is missing,
    unreadable, from another sdserve version, or when any file it lists is missing."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise InvalidArgument(f"{directory}: no such directory", field=flag)
    if not path.is_file():
        raise InvalidArgument(f"{directory} is not a compiled directory (no {MANIFEST_FILE}); "
                              "write one with `sdserve compile onnx`", field=flag)
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise InvalidArgument(f"{directory}: manifest format {raw.get('format')} is not {FORMAT}; "
                                  "export it again", field=flag)
        components = {name: _component(entry) for name, entry in raw["components"].items()}
        manifest = Manifest(
            kind=raw["kind"], sdserve_version=raw["sdserve_version"], base=raw["base"],
            base_digest=raw["base_digest"], family=raw["family"], opset=int(raw["opset"]), fp16=bool(raw["fp16"]),
            components=components, files=tuple(raw["files"]), format=raw["format"],
            stack=tuple(dict(entry) for entry in raw.get("stack", ())),
            base_export=raw.get("base_export", ""), base_export_fingerprint=raw.get("base_export_fingerprint", ""),
            controlnets=dict(raw.get("controlnets", {})),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InvalidArgument(f"{directory}: {MANIFEST_FILE} is unreadable ({type(error).__name__}); "
                              "export it again", field=flag) from None
    if manifest.sdserve_version != version:
        raise InvalidArgument(f"{directory} was compiled by sdserve {manifest.sdserve_version}, this is "
                              f"{version}; export it again", field=flag)
    graphs = _check_base_export(directory, manifest, flag)
    for component in manifest.components.values():
        for root, relative in ((graphs, component.graph), (graphs, component.weights), (directory, component.config),
                               (directory, component.overrides)):
            if relative and not (root / relative).is_file():
                raise InvalidArgument(f"{directory}: component {component.name} is missing {relative}; "
                                      "export it again", field=flag)
    for relative in manifest.files:
        if not (directory / relative).exists():
            raise InvalidArgument(f"{directory}: {relative} is missing; export it again", field=flag)
    return manifest


def _check_base_export(directory: Path, manifest: Manifest, flag: str) -> Path:
    """The directory holding the graphs; for a refit, its base export, refused when it is gone or
    is no longer the export the refit was written against."""
    if not manifest.base_export:
        return directory
    base = graph_dir(directory, manifest)
    if not (base / MANIFEST_FILE).is_file():
        raise InvalidArgument(f"{directory}: its base export {base} is missing; refit the export again", field=flag)
    try:
        fingerprint = export_fingerprint(base)
    except (OSError, ValueError, KeyError, TypeError):
        fingerprint = ""
    if fingerprint != manifest.base_export_fingerprint:
        raise InvalidArgument(f"{directory}: its base export {base} has changed since the refit; refit it again",
                              field=flag)
    return base

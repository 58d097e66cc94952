"""`compile refit`: new weights for an exported graph, for another LoRA stack, without re-export.

The export's manifest maps every adapter target to the graph initializer holding its weight
(`manifest.Component.refit`). A refit reads those initializers from the export's own weights
file (only the ones the stack touches, by their offsets), adds the stack's deltas with the same
float64 sum and single rounding as `compile fuse` (`fuse.stack_deltas`), and writes the results
as `<component>/refit.safetensors` in a new directory. The graphs and their weights files stay
in the export and are read there (the manifest's `base_export`, a path relative to the refit,
and `export_fingerprint` of the export): copying an SD UNet's 3.4 GB weights was most of a
refit's time. The refit holds only the new initializers, the configs, scheduler, tokenizers and
`sdserve.json`; a reader refuses it when the export is gone or has changed. A session opens the
export's graph and takes the new values as external initializers (`onnx_session.open_session`).

The export's files are never changed, and a refit of a refit points at (and reads) the same base
export: every refit starts from the base weights, so A -> B -> A gives exactly A's weights.

Where the recorded base model is at hand (same weight digest), each refit component is checked
in onnxruntime against the torch model with the same stack folded in, as an export is checked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sdserve import __version__
from sdserve.adapters.targets import TargetSpec
from sdserve.compile.fuse import fold, stack_deltas
from sdserve.compile.manifest import (
    Check,
    Component,
    Manifest,
    export_fingerprint,
    graph_dir,
    read_manifest,
    write_manifest,
)
from sdserve.compile.source import LoRAArg, StackLoRA, check_out_dir, load_stack_for
from sdserve.errors import InvalidArgument

OVERRIDES_FILE = "refit.safetensors"
# What a refit is checked on: the weights these graphs hold are the ones adapters change.
CHECKED = ("text_encoder", "text_encoder_2", "unet")


@dataclass(frozen=True)
class RefitConfig:
    """One refit; the `sdserve compile refit` flags mirror these fields."""

    onnx: Path
    """A directory written by `compile onnx` (or by a refit: its base export is read again)."""
    out: Path
    """The directory to write (refused if it exists, unless `force`)."""
    loras: tuple[LoRAArg, ...] = ()
    """The LoRA stack, each at its scale."""
    force: bool = False
    """Replace OUT if it exists."""
    progress: bool = True
    """Show a progress bar."""
    check: bool = True
    """Check the refit graphs against the torch model with the stack folded in (needs the base)."""


@dataclass(frozen=True)
class RefitResult:
    out: Path
    initializers: int  # weights written
    checks: tuple[tuple[str, Check], ...]  # (component, check); empty when not checked
    unchecked: str = ""  # why there is no check
    failed: tuple[str, ...] = ()  # components past the tolerance (then nothing was written)


def _initializers(directory: Path, component: Component) -> dict[str, Any]:
    """name -> the onnx TensorProto (without data) of every initializer in the refit map;
    `directory` holds the graphs (`manifest.graph_dir`)."""
    import onnx

    graph = onnx.load(str(directory / component.graph), load_external_data=False).graph
    wanted = set(component.refit.values())
    return {init.name: init for init in graph.initializer if init.name in wanted}


def graph_targets(directory: Path, manifest: Manifest) -> dict[str, TargetSpec]:
    """Adapter targets as the graphs hold them: a 2-D weight [out, in] a linear layer, a 4-D one
    [out, in, kh, kw] a conv (stride and padding play no part in folding)."""
    targets: dict[str, TargetSpec] = {}
    for component in manifest.components.values():
        protos = _initializers(graph_dir(directory, manifest), component)
        for target, name in component.refit.items():
            dims = tuple(int(d) for d in protos[name].dims)
            if len(dims) == 2:
                targets[target] = TargetSpec("linear", dims[1], dims[0])
            elif len(dims) == 4:
                targets[target] = TargetSpec("conv", dims[1], dims[0], kernel_size=(dims[2], dims[3]))
    return targets


def read_initializer(directory: Path, component: Component, proto: Any) -> np.ndarray:
    """One initializer's value from the component's external data file (only its bytes)."""
    import onnx

    info = {entry.key: entry.value for entry in proto.external_data}
    if not info:  # stored inside the graph
        return onnx.numpy_helper.to_array(proto)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(proto.data_type)
    path = (directory / component.graph).parent / info["location"]
    count = int(info["length"]) // dtype.itemsize
    value = np.fromfile(path, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    return value.reshape(tuple(int(d) for d in proto.dims))


def _refit_values(directory: Path, component: Component, deltas: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """initializer -> base value + delta, rounded once to the initializer's dtype."""
    protos = _initializers(directory, component)
    values = {}
    for target, name in component.refit.items():
        if target not in deltas:
            continue
        base = read_initializer(directory, component, protos[name])
        total = torch.from_numpy(base.astype(np.float64)) + deltas[target].reshape(base.shape)
        values[name] = total.numpy().astype(base.dtype)
    return values


def _stage(directory: Path, manifest: Manifest, staging: Path) -> None:
    """Copy what a served refit reads besides the graphs: configs, scheduler, tokenizers, sdserve.json
    (kilobytes). The graphs and weights stay in the base export (`graph_dir`)."""
    copied = [component.config for component in manifest.components.values()]
    for relative in [*copied, *manifest.files]:
        source, target = directory / relative, staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)


def _check(directory: Path, manifest: Manifest, stack: Sequence[StackLoRA], names: Sequence[str]
           ) -> tuple[tuple[tuple[str, Check], ...], str]:
    """Each refit component against the base's torch module with the stack folded in."""
    from sdserve.compile.onnx_export import check_graph, check_shapes
    from sdserve.compile.onnx_graphs import text_encoder_spec, unet_spec
    from sdserve.compile.onnx_session import open_session
    from sdserve.compile.source import load_base
    from sdserve.trainers.components import model_digest

    try:
        base = load_base(manifest.base)
    except InvalidArgument:
        return (), f"the base model {manifest.base!r} is not at hand"
    if model_digest(base.path) != manifest.base_digest:
        return (), f"the base model {manifest.base!r} here is not the one exported"
    fold(base.components, stack)
    length = base.loaded.tokenizers[0].model_max_length
    specs = {component: text_encoder_spec(component, encoder, length)
             for component, encoder in zip(("text_encoder", "text_encoder_2"), base.loaded.text_encoders)}
    specs["unet"] = unet_spec(base.loaded.unet, torch.float16 if manifest.fp16 else torch.float32, length)
    checks = []
    for name in names:
        spec, component = specs[name], manifest.components[name]
        session = open_session(directory, manifest, name)
        checks.append((name, check_graph(spec, session, check_shapes(base), component.check.tolerance)))
    return tuple(checks), ""


def refit(config: RefitConfig) -> RefitResult:
    """Write OUT: the export at `config.onnx` with the stack's weights, checked where the base is
    at hand; nothing is written when a check fails past the export's tolerance."""
    from sdserve.compile.onnx_export import publish_modes
    from sdserve.trainers.output import replace_directory

    if not config.loras:
        raise InvalidArgument("give at least one --lora", field="--lora")
    directory = Path(config.onnx).expanduser().resolve()
    manifest = read_manifest(directory, flag="--onnx")
    out = Path(config.out).expanduser().resolve()
    graphs = graph_dir(directory, manifest)  # the base export, also for a refit of a refit
    check_out_dir(out, config.force, [directory, graphs])
    stack = load_stack_for(graph_targets(directory, manifest), manifest.family, config.loras)
    deltas = stack_deltas(stack)
    # Relative to OUT, so the two can move together; the staging dir is OUT's sibling: the same path.
    base_export = os.path.relpath(graphs, out)
    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        _stage(directory, manifest, staging)
        components = dict(manifest.components)
        written, refit_names = 0, []
        bar = tqdm(list(manifest.components.values()), desc="refit", unit="graph", disable=not config.progress,
                   dynamic_ncols=True)
        for component in bar:
            values = _refit_values(graphs, component, deltas)
            if not values:
                components[component.name] = replace(component, overrides="")
                continue
            from safetensors.numpy import save_file

            relative = f"{component.name}/{OVERRIDES_FILE}"
            save_file(values, str(staging / relative))
            components[component.name] = replace(component, overrides=relative)
            written += len(values)
            refit_names.append(component.name)
        new = replace(manifest, sdserve_version=__version__, components=components,
                      stack=tuple(entry.record() for entry in stack), base_export=base_export,
                      base_export_fingerprint=export_fingerprint(graphs))
        write_manifest(staging, new)
        checks, unchecked = ((), "not asked for")
        if config.check:
            checks, unchecked = _check(staging, new, stack, [n for n in refit_names if n in CHECKED])
        failed = tuple(name for name, check in checks if not check.passed)
        if not failed:
            publish_modes(staging)
            replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RefitResult(out, written, checks, unchecked, failed)

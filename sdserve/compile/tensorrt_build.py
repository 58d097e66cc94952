"""`compile tensorrt`: refittable TensorRT engines built from a `compile onnx` (or refit) directory.

Each served graph (text encoder(s), UNet, VAE decoder and encoder) is parsed by TensorRT's ONNX
parser, which names every weight after its ONNX initializer, so the export's refit map (adapter
target -> initializer) is also the engine's map of refittable weights. Only those weights are
marked refittable (`BuilderFlag.REFIT_INDIVIDUAL` + `mark_weights_refittable`): the rest stay
constants TensorRT may fold. Where the source directory is a refit (`refit.py`), the engine is
built from the export's base weights and then refitted with the refit's values through the same
map, so one build serves every stack of that graph.

Dynamic axes get one optimization profile: batch 1..`max_batch` (optimum 2, a guided image),
sides from the model's limits (optimum its default size). ControlNets and the ControlNet-taking
UNet are not built (their residual inputs have per-level sizes; not needed until a backend serves
TensorRT engines, which none does yet).

Where `tensorrt` does not import, the command says so in one line naming the extra
(`pip install 'sdserve[tensorrt]'`) before it reads anything; everything else is checkable
without it (`profile_shapes`, and the refit map and graphs it reads, tested with the export).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sdserve.compile.manifest import Component, Manifest, TensorInfo, graph_dir, read_manifest
from sdserve.errors import InvalidArgument

BUILT = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
ENGINE_MANIFEST = "sdserve-tensorrt.json"


class BuildFailed(Exception):
    """TensorRT could not parse, build or refit a valid export (exit 1: the input was fine)."""


@dataclass(frozen=True)
class TensorRTConfig:
    """One build; the `sdserve compile tensorrt` flags mirror these fields."""

    onnx: Path
    """A directory written by `compile onnx` or `compile refit` (only read)."""
    out: Path
    """The directory to write (refused if it exists, unless `force`)."""
    max_batch: int = 8
    """Largest batch (UNet rows) each engine's profile takes."""
    fp16: bool = False
    """Let TensorRT pick float16 kernels (`BuilderFlag.FP16`) for float32 graphs."""
    force: bool = False
    """Replace OUT if it exists."""
    progress: bool = True
    """Show a progress bar."""


@dataclass(frozen=True)
class TensorRTResult:
    out: Path
    engines: tuple[str, ...]  # components built
    refitted: int  # weights refitted from the source's refit values


def require_tensorrt() -> Any:
    """The tensorrt module, or one line naming the extra."""
    try:
        import tensorrt
    except ImportError:
        raise InvalidArgument("tensorrt is not installed; install the extra: pip install 'sdserve[tensorrt]' "
                              "(needs an NVIDIA GPU)", field="compile tensorrt") from None
    return tensorrt


def profile_shapes(tensor: TensorInfo, manifest_info: dict[str, Any], max_batch: int
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shape of one graph input. Named axes: "batch" 1..max_batch (opt 2);
    "height"/"width" latent sides and "image_height"/"image_width" pixel sides from the model's
    limits, opt its default size. `manifest_info`: the directory's sdserve.json."""
    defaults, limits = manifest_info["defaults"], manifest_info.get("limits", {})
    factor = int(manifest_info["vae_scale_factor"])
    low, high = int(limits.get("min_side", 64)), int(limits.get("max_side", 1024))
    pixel = {"image_height": (low, defaults["height"], high), "image_width": (low, defaults["width"], high)}
    latent = {"height": tuple(max(1, side // factor) for side in pixel["image_height"]),
              "width": tuple(max(1, side // factor) for side in pixel["image_width"])}
    sizes = {"batch": (1, min(2, max_batch), max_batch), **pixel, **latent}
    shapes: list[tuple[int, int, int]] = []
    for axis in tensor.shape:
        if isinstance(axis, int):
            shapes.append((axis, axis, axis))
        elif axis in sizes:
            shapes.append(sizes[axis])
        else:
            raise InvalidArgument(f"input {tensor.name} has an axis {axis!r} with no known range", field="--onnx")
    return tuple(s[0] for s in shapes), tuple(s[1] for s in shapes), tuple(s[2] for s in shapes)


def _serving_info(directory: Path, manifest: Manifest) -> dict[str, Any]:
    meta = json.loads((directory / "sdserve.json").read_text())
    vae = json.loads((directory / manifest.components["vae_decoder"].config).read_text())
    meta["vae_scale_factor"] = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return meta


def _build_one(trt: Any, logger: Any, directory: Path, component: Component, info: dict[str, Any],
               config: TensorRTConfig) -> bytes:
    """A serialized engine of `component`, with its refit-map weights refittable."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(directory / component.graph)):  # reads the external data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildFailed(f"TensorRT cannot parse {component.name}: {errors[:300]}")
    builder_config = builder.create_builder_config()
    if component.refit:
        builder_config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        for name in component.refit.values():
            network.mark_weights_refittable(name)
    if config.fp16:
        builder_config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for tensor in component.inputs:
        profile.set_shape(tensor.name, *profile_shapes(tensor, info, config.max_batch))
    builder_config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, builder_config)
    if plan is None:
        raise BuildFailed(f"TensorRT could not build {component.name} (see its log above)")
    return bytes(plan)


def refit_engine(trt: Any, logger: Any, plan: bytes, values: dict[str, Any],
                 base_values: Callable[[list[str]], dict[str, Any]]) -> bytes:
    """`plan` with the named weights (initializer name -> numpy array) replaced, re-serialized;
    `base_values(names)` gives the graph's own values of weights TensorRT asks for besides them."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    refitter = trt.Refitter(engine, logger)
    for name, array in values.items():
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise BuildFailed(f"TensorRT refused the refit weight {name}")
    missing = list(refitter.get_missing_weights())
    if missing:  # weights TensorRT fused with these must be given again: their base values
        for name, array in base_values(missing).items():
            refitter.set_named_weights(name, trt.Weights(array))
        if refitter.get_missing_weights():
            raise BuildFailed(f"TensorRT needs weights the graph does not name to refit, e.g. {missing[0]}")
    if not refitter.refit_cuda_engine():
        raise BuildFailed("TensorRT could not refit the engine")
    return bytes(engine.serialize())


def graph_values(directory: Path, component: Component, names: list[str]) -> dict[str, Any]:
    """initializer name -> numpy array, read from the component's graph and its external data."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(directory / component.graph)).graph
    wanted = set(names)
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer if init.name in wanted}


def build_tensorrt(config: TensorRTConfig) -> TensorRTResult:
    """Build (and refit, for a refit directory) every served graph; write OUT whole or not at all."""
    trt = require_tensorrt()
    from tqdm import tqdm

    from sdserve.compile.onnx_export import publish_modes
    from sdserve.compile.onnx_session import component_overrides
    from sdserve.compile.source import check_out_dir
    from sdserve.trainers.output import replace_directory

    if not 1 <= config.max_batch <= 64:
        raise InvalidArgument(f"must be between 1 and 64 (got {config.max_batch})", field="--max-batch")
    source = Path(config.onnx).expanduser().resolve()
    manifest = read_manifest(source)
    out = Path(config.out).expanduser().resolve()
    check_out_dir(out, config.force, [source, graph_dir(source, manifest)])
    info = _serving_info(source, manifest)
    logger = trt.Logger(trt.Logger.WARNING)
    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    built, refitted = [], 0
    try:
        names = [name for name in BUILT if name in manifest.components]
        for name in tqdm(names, desc="tensorrt", unit="engine", disable=not config.progress, dynamic_ncols=True):
            component = manifest.components[name]
            graphs = graph_dir(source, manifest)  # a refit's graphs are its base export's
            plan = _build_one(trt, logger, graphs, component, info, config)
            overrides = component_overrides(source, component)
            if overrides:
                plan = refit_engine(trt, logger, plan, overrides, partial(graph_values, graphs, component))
                refitted += len(overrides)
            (staging / f"{name}.plan").write_bytes(plan)
            built.append(name)
        for relative in manifest.files:
            target = staging / relative
            (shutil.copytree if (source / relative).is_dir() else shutil.copy2)(source / relative, target)
        record = {"kind": "tensorrt", "tensorrt_version": trt.__version__, "sdserve_version": manifest.sdserve_version,
                  "base": manifest.base, "base_digest": manifest.base_digest, "stack": list(manifest.stack),
                  "max_batch": config.max_batch, "fp16": config.fp16,
                  "engines": {name: f"{name}.plan" for name in built},
                  "refit": {name: dict(manifest.components[name].refit) for name in built}}
        (staging / ENGINE_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        publish_modes(staging)
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TensorRTResult(out, tuple(built), refitted)

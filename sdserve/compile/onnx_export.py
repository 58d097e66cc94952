"""`compile onnx`: every component of a model exported to ONNX and checked in onnxruntime.

Each graph is traced (torch's TorchScript exporter: the dynamo one needs onnxscript, which the
`onnx` extra does not install) with dynamic batch and, for the UNet, VAE and ControlNets,
dynamic height and width, then saved with its weights in one external data file beside it
(`unet/model.onnx` + `unet/model.onnx.data`; an SD UNet is past protobuf's 2 GB). Each is then
run in onnxruntime's CPU provider on seeded inputs at two shapes (batch 2 at the model's default
size, batch 1 at another size it serves) and compared with the torch module: the largest
absolute error, and that divided by the largest |torch output|, which must stay within the
tolerance or nothing is written.

The directory is staged beside OUT and renamed into place whole. Besides the graphs it holds the
model's scheduler, tokenizer(s) and `sdserve.json` (family, defaults, limits), and the manifest
(`manifest.py`) a backend reads to serve it. It has no `model_index.json`: it is not a diffusers
directory, and the eager engine refuses it as one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sdserve import __version__
from sdserve.compile.manifest import Check, Component, Manifest, TensorInfo, write_manifest
from sdserve.compile.onnx_graphs import (
    GraphSpec,
    controlled_unet_spec,
    controlnet_spec,
    text_encoder_spec,
    unet_spec,
    vae_specs,
)
from sdserve.compile.source import BaseModel, check_out_dir, describe_model, load_base
from sdserve.errors import InvalidArgument
from sdserve.models.builtin import METADATA_FILE

MIN_OPSET, MAX_OPSET = 14, 21  # scaled_dot_product_attention needs 14; 21 is what torch's exporter knows


@dataclass(frozen=True)
class ControlNetArg:
    """One `--controlnet NAME=DIR`."""

    name: str
    path: Path


def parse_controlnet_arg(text: str) -> ControlNetArg:
    name, sep, path = text.partition("=")
    if not sep or not name or not path or "/" in name:
        raise InvalidArgument(f"{text!r}: expected NAME=DIR", field="--controlnet")
    return ControlNetArg(name, Path(path))


@dataclass(frozen=True)
class OnnxConfig:
    """One export; the `sdserve compile onnx` flags mirror these fields."""

    model: str
    """A built-in model name or a diffusers directory (never written)."""
    out: Path
    """The directory to write (refused if it exists, unless `force`)."""
    opset: int = 17
    """ONNX opset of every graph."""
    fp16: bool = False
    """Export the UNet and ControlNets in float16. The VAE stays float32 where its config asks
    for an upcast (as the engine runs it); the text encoders stay float32 (a small share of the
    weights, and the traced float16 CLIP graph binds float32 and float16 in one LayerNormalization,
    which onnxruntime refuses)."""
    controlnets: tuple[ControlNetArg, ...] = ()
    """ControlNets registered for the model, exported as `controlnet/NAME` (plus a UNet that
    takes their residuals)."""
    force: bool = False
    """Replace OUT if it exists."""
    progress: bool = True
    """Show a progress bar."""
    tolerance: float = 1e-3
    """Largest max|onnxruntime − torch| / max|torch| a float32 component may show."""
    fp16_tolerance: float = 3e-2
    """The same for float16 components, against the float32 torch module."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    checks: tuple  # (component name, Check) as CheckRow
    failed: tuple[str, ...]


@dataclass(frozen=True)
class CheckRow:
    component: str
    max_abs: float
    max_rel: float
    tolerance: float


def _require_onnx() -> None:
    """One line naming the extra when onnx or onnxruntime is not installed."""
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise InvalidArgument(f"{module} is not installed; install the extra: pip install 'sdserve[onnx]'",
                                  field="compile onnx") from None


def check_config(config: OnnxConfig) -> None:
    if not MIN_OPSET <= config.opset <= MAX_OPSET:
        raise InvalidArgument(f"must be between {MIN_OPSET} and {MAX_OPSET} (got {config.opset})", field="--opset")
    names = [arg.name for arg in config.controlnets]
    if len(set(names)) != len(names):
        raise InvalidArgument("two ControlNets share a name", field="--controlnet")


def _load_controlnets(base: BaseModel, args: Sequence[ControlNetArg], dtype: torch.dtype
                      ) -> dict[str, torch.nn.Module]:
    """Each --controlnet checked against the model's UNet as the engine checks it, then loaded."""
    from sdserve.engine.controlnet import ControlNetStore, _load_controlnet

    store = ControlNetStore(allow_paths=False)
    loaded = {}
    for arg in args:
        try:
            store.register(arg.name, arg.path)
            model = store.check_fits(arg.name, base.info, "--controlnet")
        except InvalidArgument as error:
            raise InvalidArgument(f"{arg.name}: {error.message}", field="--controlnet") from None
        loaded[arg.name] = _load_controlnet(model.path, torch.device("cpu"), dtype)
    return loaded


def graph_specs(base: BaseModel, config: OnnxConfig) -> list[GraphSpec]:
    """What to export, in order; modules cast to the export dtype."""
    loaded = base.loaded
    dtype = torch.float16 if config.fp16 else torch.float32
    force_upcast = bool(getattr(loaded.vae.config, "force_upcast", True))
    vae_dtype = torch.float32 if (config.fp16 and force_upcast) else dtype
    length = loaded.tokenizers[0].model_max_length
    specs = []
    for component, encoder in zip(("text_encoder", "text_encoder_2"), loaded.text_encoders):
        specs.append(text_encoder_spec(component, encoder, length))  # float32: see OnnxConfig.fp16
    specs.append(unet_spec(loaded.unet.to(dtype), dtype, length))
    specs.extend(vae_specs(loaded.vae.to(vae_dtype), vae_dtype, base.info.vae_scale_factor))
    controlnets = _load_controlnets(base, config.controlnets, dtype)
    for name, controlnet in controlnets.items():
        specs.append(controlnet_spec(name, controlnet, loaded.unet.config, dtype, length))
    if controlnets:
        specs.append(controlled_unet_spec(loaded.unet, specs[-1]))
    return specs


def check_shapes(base: BaseModel) -> list[tuple[int, int, int]]:
    """(batch, latent h, latent w) the check runs: batch 2 at the default size, batch 1 at another
    size the model serves (one downsampling multiple taller, or shorter where that is past the limit)."""
    info = base.info
    factor = info.vae_scale_factor
    multiple = 2 ** (len(info.unet_config.get("block_out_channels", [0])) - 1)
    h, w = info.defaults.height // factor, info.defaults.width // factor
    taller = h + multiple
    other = taller if taller * factor <= info.limits.max_side else max(multiple, h - multiple)
    return [(2, h, w), (1, other, w)]


def _export_one(spec: GraphSpec, directory: Path, opset: int, example: dict[str, torch.Tensor]) -> None:
    """Trace `spec` on `example` into directory/model.onnx with its weights in model.onnx.data."""
    import onnx

    directory.mkdir(parents=True, exist_ok=True)
    args = tuple(example[name] for name in spec.inputs)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        traced = Path(scratch) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer notes about Python branches on shapes (diffusers' size checks): the dynamic
            # axes are checked by running the graph at other sizes instead.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                spec.module, args, str(traced), dynamo=False, opset_version=opset,
                input_names=list(spec.inputs), output_names=list(spec.outputs), dynamic_axes=spec.dynamic_axes,
                do_constant_folding=False,  # keeps initializers under their parameter names (refit map)
            )
        graph = onnx.load(str(traced))  # with any external data the exporter split off (> 2 GB)
    onnx.save_model(graph, str(directory / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    (directory / "config.json").write_text(json.dumps(spec.config, indent=2, default=str) + "\n")


def _tensor_infos(values) -> tuple[TensorInfo, ...]:
    import onnx

    infos = []
    for value in values:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in tensor.shape.dim)
        infos.append(TensorInfo(value.name, dtype, shape))
    return tuple(infos)


def _graph_facts(directory: Path, spec: GraphSpec, targets: Mapping[str, object]
                 ) -> tuple[tuple, tuple, str, dict[str, str]]:
    """(inputs, outputs, weight dtype, refit map) read from the saved graph; the refit map holds
    the adapter `targets` whose weight is an initializer of the graph."""
    import onnx

    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    names = {init.name: init.data_type for init in graph.initializer}
    component = spec.name
    refit = {}
    if component in ("unet", "text_encoder", "text_encoder_2", "unet_controlled"):
        prefix = "unet" if component == "unet_controlled" else component
        for name in sorted(names):
            target = name.removesuffix(".weight")
            if name.startswith(prefix + ".") and name.endswith(".weight") and target in targets:
                refit[target] = name
    float_types = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
    dtype = next((float_types[t] for t in names.values() if t in float_types), "float32")
    return _tensor_infos(graph.input), _tensor_infos(graph.output), dtype, refit


def open_graph(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_graph(spec: GraphSpec, session, shapes: Sequence[tuple[int, int, int]], tolerance: float,
                reference: torch.nn.Module | None = None) -> Check:
    """onnxruntime `session` against torch on seeded inputs at each shape. `reference` (default:
    the exported module) is what the graph is compared with: the float32 module for a float16
    export, the fused module for a refit."""
    worst_abs, worst_rel, checked = 0.0, 0.0, []
    runs = shapes if spec.spatial else [(shapes[0][0], 0, 0)]
    for index, (batch, h, w) in enumerate(runs):
        generator = torch.Generator().manual_seed(index)
        inputs = spec.make_inputs(batch, h, w, generator)
        feed = {name: inputs[name].numpy() for name in spec.inputs}
        got = session.run(list(spec.outputs), feed)
        module = reference if reference is not None else spec.module
        with torch.no_grad():
            args = tuple(_as(inputs[name], module) for name in spec.inputs)
            want = module(*args)
        want = (want,) if isinstance(want, torch.Tensor) else tuple(want)
        for ours, theirs in zip(got, want, strict=True):
            expected = theirs.float()
            error = float((torch.from_numpy(ours).float() - expected).abs().max())
            worst_abs = max(worst_abs, error)
            worst_rel = max(worst_rel, error / max(float(expected.abs().max()), 1e-12))
        checked.append(f"batch {batch}" + (f", {h}x{w} latents" if spec.spatial else ""))
    return Check(worst_abs, worst_rel, tolerance, tuple(checked))


def _as(tensor: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """An input in the reference module's float dtype (ids and timesteps as they are)."""
    if not tensor.is_floating_point() or tensor.ndim == 1:
        return tensor
    return tensor.to(next(module.parameters()).dtype)


def _serving_files(base: BaseModel, staging: Path, name: str) -> tuple[str, ...]:
    """Copy the scheduler and tokenizer(s), and write sdserve.json, as a served model needs them."""
    files = []
    for directory in ("scheduler", "tokenizer", "tokenizer_2"):
        if (base.path / directory).is_dir():
            shutil.copytree(base.path / directory, staging / directory)
            files.append(directory)
    meta = {
        "name": name,
        "family": base.info.family,
        "description": f"ONNX export of {base.name}",
        "defaults": dataclasses.asdict(base.info.defaults),
        "limits": dataclasses.asdict(base.info.limits),
        "compile": {"kind": "onnx", "sdserve_version": __version__, "manifest": "sdserve-compile.json"},
    }
    index = base.path / "model_index.json"  # the one serving fact kept there (SDXL's empty negative prompt)
    if index.is_file():
        meta["force_zeros_for_empty_prompt"] = bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
    (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return (*files, METADATA_FILE)


def publish_modes(staging: Path) -> None:
    """The modes an ordinary `open`/`mkdir` gives (mkdtemp makes 0700, and onnx's and
    safetensors' writers leave some files 0600), so a server run as another user can read OUT."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for path in [staging, *staging.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def export_onnx(config: OnnxConfig) -> ExportResult:
    """Export, check and write OUT; on a failed check nothing is written and `failed` names the
    components past the tolerance."""
    from sdserve.engine.store import directory_digest
    from sdserve.trainers.components import model_digest
    from sdserve.trainers.output import replace_directory

    _require_onnx()
    check_config(config)
    out = Path(config.out).expanduser().resolve()
    path, _ = describe_model(config.model)
    check_out_dir(out, config.force, [path, *(arg.path for arg in config.controlnets)])
    base = load_base(config.model)
    reference = load_base(config.model) if config.fp16 else None  # float32 modules to check float16 against
    specs = graph_specs(base, config)
    references = graph_specs(reference, dataclasses.replace(config, fp16=False)) if reference else specs
    shapes = check_shapes(base)
    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    components, rows, failed = {}, [], []
    try:
        bar = tqdm(specs, desc="onnx", unit="graph", disable=not config.progress, dynamic_ncols=True)
        for spec, ref in zip(bar, references, strict=True):
            bar.set_postfix_str(spec.name)
            directory = staging / spec.name
            example = spec.make_inputs(*shapes[0], torch.Generator().manual_seed(0))
            _export_one(spec, directory, config.opset, example)
            fp16 = config.fp16 and next(spec.module.parameters()).dtype == torch.float16
            tolerance = config.fp16_tolerance if fp16 else config.tolerance
            check = check_graph(spec, open_graph(directory / "model.onnx"), shapes, tolerance,
                                reference=ref.module if reference else None)
            inputs, outputs, dtype, refit = _graph_facts(directory, spec, base.targets)
            components[spec.name] = Component(
                name=spec.name, graph=f"{spec.name}/model.onnx", weights=f"{spec.name}/model.onnx.data",
                config=f"{spec.name}/config.json", inputs=inputs, outputs=outputs, dtype=dtype, check=check,
                refit=refit,
            )
            rows.append(CheckRow(spec.name, check.max_abs, check.max_rel, check.tolerance))
            if not check.passed:
                failed.append(spec.name)
        if not failed:
            files = _serving_files(base, staging, out.name)
            write_manifest(staging, Manifest(
                kind="onnx", sdserve_version=__version__, base=config.model, base_digest=model_digest(base.path),
                family=base.info.family, opset=config.opset, fp16=config.fp16, components=components, files=files,
                controlnets={arg.name: directory_digest(arg.path.expanduser().resolve()) for arg in config.controlnets},
            ))
            publish_modes(staging)
            replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out, tuple(rows), tuple(failed))

"""The onnxruntime backend: a directory written by `sdserve compile onnx`, served by the engine.

Only the model's calls change: the text encoder(s), the UNet and the VAE run as onnxruntime
sessions, behind objects that answer the calls the engine already makes of the torch modules
(`encoder(ids)[0]`, `.hidden_states[-2]`, `vae.decode(z)`, `vae.encode(x).latent_dist`). So the
request's schedulers, seeds, noise, guidance interval and the step-level batcher are the eager
path's own code, and a compiled model's rows batch with each other exactly as eager rows do.

A compiled model holds one fixed stack (its export's, or a refit's, in its weights): per-request
weights (LoRAs, embeddings, hypernetworks, IP-Adapters) are refused at validation
(`refuse_per_request_weights`), before any work. ControlNet units are served when the export
holds their ControlNet (`exported_controlnet`): its graph gives the residuals, scaled and summed
per row as the eager path does (engine/controlnet.py), and the `unet_controlled` graph takes
them. Sessions take numpy arrays on the host; with the CUDA or TensorRT provider each call
copies in and out (no I/O binding yet).

The engine reads compile's manifest (`sdserve.compile.manifest`, `onnx_session`): both are leaf
modules that import nothing of the engine, so the one-way rule (compile -> engine) still holds
for everything that does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdserve.engine.batch import Batch
from sdserve.engine.model import LoadedModel, ModelInfo
from sdserve.engine.model_limits import ModelDefaults, ModelLimits
from sdserve.engine.request import EngineRequest
from sdserve.errors import InvalidArgument, NotFound

BACKEND = "onnxruntime"
MANIFEST_FILE = "sdserve-compile.json"  # compile/manifest.py's name; checked equal in tests
# Best first; whichever onnxruntime build is installed says which it has.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def is_compiled_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def providers() -> list[str]:
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    return [name for name in PREFERRED_PROVIDERS if name in available]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def read_onnx_model_info(name: str, path: Path) -> ModelInfo:
    """Describe a compiled directory from its manifest and the configs export wrote beside each
    graph. The manifest is checked first (version, every listed file present); its error names
    `model`."""
    from sdserve.compile.manifest import read_manifest

    manifest = read_manifest(path, flag="model")
    if manifest.kind != "onnx":
        raise InvalidArgument(f"{path}: a {manifest.kind!r} export is not served by onnxruntime", field="model")
    meta = _read_json(path / "sdserve.json")
    unet = _read_json(path / manifest.components["unet"].config)
    vae = _read_json(path / manifest.components["vae_decoder"].config)
    text_widths = {
        component: int(_read_json(path / manifest.components[component].config)["hidden_size"])
        for component in ("text_encoder", "text_encoder_2") if component in manifest.components
    }
    cross = unet.get("cross_attention_dim", 768)
    return ModelInfo(
        name=name,
        path=path,
        family=manifest.family,
        defaults=ModelDefaults(**meta["defaults"]),
        limits=ModelLimits(**meta.get("limits", {})),
        vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0])) - 1),
        latent_channels=int(vae.get("latent_channels", 4)),
        unet_in_channels=int(unet.get("in_channels", 4)),
        scheduler_config=_read_json(path / "scheduler" / "scheduler_config.json"),
        text_widths=text_widths,
        attention_widths=tuple(sorted(set(unet.get("block_out_channels", [])) | {int(cross)})),
        unet_config=unet,
        description=meta.get("description", ""),
        backend=BACKEND,
    )


def onnx_lora_targets(info: ModelInfo) -> dict[str, Any]:
    """The LoRA targets of the exported modules (what uploads for the model's family are checked
    against): the refit map's targets, shapes read off the graphs' initializers, a conv's stride,
    padding and dilation off the Conv node that reads it. Reads the graphs, not their weights."""
    import onnx

    from sdserve.adapters.targets import TargetSpec
    from sdserve.compile.manifest import graph_dir, read_manifest

    manifest = read_manifest(info.path, flag="model")
    graphs = graph_dir(info.path, manifest)  # a refit's are its base export's
    targets: dict[str, TargetSpec] = {}
    for component in manifest.components.values():
        if not component.refit or component.name == "unet_controlled":  # the UNet's own modules again
            continue
        graph = onnx.load(str(graphs / component.graph), load_external_data=False).graph
        dims = {init.name: tuple(int(d) for d in init.dims) for init in graph.initializer}
        convs = {node.input[1]: {a.name: tuple(a.ints) for a in node.attribute}
                 for node in graph.node if node.op_type == "Conv" and len(node.input) > 1}
        for target, name in component.refit.items():
            shape = dims[name]
            if len(shape) == 2:  # a linear layer's [out, in]
                targets[target] = TargetSpec("linear", shape[1], shape[0])
            elif len(shape) == 4:  # a conv's [out, in, kh, kw]
                attributes = convs.get(name, {})
                pads = attributes.get("pads", (0, 0, 0, 0))
                targets[target] = TargetSpec("conv", shape[1], shape[0], kernel_size=(shape[2], shape[3]),
                                             stride=tuple(attributes.get("strides", (1, 1))),
                                             padding=(pads[0], pads[1]),
                                             dilation=tuple(attributes.get("dilations", (1, 1))))
    return targets


class OnnxComponent:
    """One session: torch tensors in (cast to the graph's input dtypes), float32 torch tensors out."""

    def __init__(self, session: Any, inputs: dict[str, str]) -> None:
        self.session = session
        self.input_dtypes = {name: np.dtype(dtype) for name, dtype in inputs.items()}  # name -> numpy dtype
        self.output_names = [output.name for output in session.get_outputs()]

    def __call__(self, **tensors: torch.Tensor) -> list[torch.Tensor]:
        feed = {name: tensor.detach().cpu().numpy().astype(self.input_dtypes[name], copy=False)
                for name, tensor in tensors.items() if name in self.input_dtypes}
        return [torch.from_numpy(np.asarray(out, dtype=np.float32)) for out in self.session.run(None, feed)]


class _LastTwo(tuple):
    """The hidden states a text encoder graph gives: the last and the penultimate layer's. Index
    -1 and -2 as the engine does; any other layer was not exported."""

    def __getitem__(self, index):  # type: ignore[override]
        if index == -1:
            return tuple.__getitem__(self, 1)
        if index == -2:
            return tuple.__getitem__(self, 0)
        raise IndexError("an ONNX text encoder gives only its last two hidden states")


@dataclass
class TextEncoderOutput:
    """What the families read of a transformers CLIP output: `[0]` (the pooled projection for
    an encoder with one, else the last hidden state) and `.hidden_states[-1]`/`[-2]`."""

    first: torch.Tensor
    hidden_states: _LastTwo

    def __getitem__(self, index: int) -> torch.Tensor:
        if index != 0:
            raise IndexError("an ONNX text encoder output has only its first item")
        return self.first


class OnnxTextEncoder:
    """input_ids [B, T] (attention_mask [B, T]) -> `TextEncoderOutput`, like CLIPTextModel(WithProjection)."""

    dtype = torch.float32  # text encoders are exported in float32 (compile/onnx_export.py)

    def __init__(self, component: OnnxComponent, config: Any, projection: bool) -> None:
        self.component = component
        self.config = config
        self.projection = projection  # SDXL's second encoder: its first output is the pooled projection

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 output_hidden_states: bool = False) -> TextEncoderOutput:
        tensors = {"input_ids": input_ids.long()}
        if attention_mask is not None:
            tensors["attention_mask"] = attention_mask.long()
        last, penultimate, pooled = self.component(**tensors)  # [B, T, D], [B, T, D], [B, P]
        return TextEncoderOutput(pooled if self.projection else last, _LastTwo((penultimate, last)))


class _LatentDistribution:
    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        # diffusers' own class, so a sample draws from the generator exactly as the eager VAE's does
        self.latent_dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))


class OnnxVAE:
    """`decode(z, return_dict=False)[0]` and `encode(x).latent_dist` of diffusers' AutoencoderKL."""

    def __init__(self, decoder: OnnxComponent, encoder: OnnxComponent, config: Any) -> None:
        self.decoder = decoder
        self.encoder = encoder
        self.config = config

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return (self.decoder(latent_sample=latents)[0],)  # [N, 3, H, W] in [-1, 1]

    def encode(self, sample: torch.Tensor, return_dict: bool = True) -> _LatentDistribution:
        mean, logvar = self.encoder(sample=sample)  # [N, C, h, w] each
        return _LatentDistribution(mean, logvar)


class OnnxUNet:
    """The UNet session; `OnnxBackend` feeds it a batch's rows. The ControlNet graphs and the UNet
    that takes their residuals (a second copy of the UNet's weights) open on first use, so an
    export with ControlNets costs their memory only once a request uses one."""

    def __init__(self, component: OnnxComponent, config: Any,
                 open_component: Callable[[str], OnnxComponent] | None = None) -> None:
        self.component = component
        self.config = config
        self._open = open_component
        self._opened: dict[str, OnnxComponent] = {}  # component name -> session; the engine thread's alone

    def graph(self, name: str) -> OnnxComponent:
        """Component `name` ("controlnet/canny", "unet_controlled") of the export, opened once."""
        if name not in self._opened:
            if self._open is None:
                raise InvalidArgument(f"this compiled model has no {name} graph", field="controlnets")
            self._opened[name] = self._open(name)
        return self._opened[name]


def _exported_controlnets(path: Path) -> dict[str, str]:
    """NAME -> digest of every ControlNet exported into the compiled dir `path` (a refit's are its
    export's: refit copies the manifest's entries)."""
    return dict(_read_json(Path(path) / MANIFEST_FILE).get("controlnets", {}))


def exported_controlnet(store: Any, name: str, info: ModelInfo, field: str) -> Any:
    """The ControlNet a unit names, as the compiled model `info` holds it: a `DirectoryModel` named
    after its graph ("controlnet/NAME"). A name the engine's store knows (registered by the
    operator, or a directory where paths are allowed) must be the very ControlNet exported (same
    directory digest), so a server's "canny" never runs another "canny" baked into an export;
    a name the store does not know is looked up among the export's own names."""
    from sdserve.engine.store import DirectoryModel

    exported = _exported_controlnets(info.path)
    if not exported:
        raise InvalidArgument(f"model {info.name!r} is compiled ({info.backend}) without ControlNets; export it "
                              "with --controlnet NAME=DIR, or use the eager model", field=field)
    try:
        source = store.resolve(name, field)
    except NotFound:
        source = None
    if source is None:
        chosen = name if name in exported else None
    else:
        chosen = next((exported_name for exported_name, digest in sorted(exported.items())
                       if digest == source.digest), None)
    if chosen is None:
        raise InvalidArgument(f"model {info.name!r} is compiled with the ControlNets {', '.join(sorted(exported))} "
                              f"and serves no other", field=field)
    return DirectoryModel(f"controlnet/{chosen}", info.path, exported[chosen], {})


def session_options(onnxruntime: Any) -> Any:
    """Session options that share the CPU as the engine's torch does: as many intra-op threads as
    torch uses (onnxruntime's default is one per physical core, whatever the server was given),
    and no spin-waiting where OMP_WAIT_POLICY=PASSIVE asks torch's OpenMP pool not to spin: a
    spinning pool burns the share of the cores that the other process (or the eager models of
    the same server) needs between calls."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_onnx_model(info: ModelInfo) -> LoadedModel:
    """Open every served component's session (refit weights applied) on the preferred provider."""
    import onnxruntime
    from diffusers.configuration_utils import FrozenDict
    from transformers import CLIPTextConfig, CLIPTokenizer

    from sdserve.compile.manifest import read_manifest
    from sdserve.compile.onnx_session import open_session

    path = info.path
    manifest = read_manifest(path, flag="model")
    chosen = providers()

    def component(name: str) -> OnnxComponent:
        options = session_options(onnxruntime)
        session = open_session(path, manifest, name, providers=chosen, options=options)
        return OnnxComponent(session, {t.name: t.dtype for t in manifest.components[name].inputs})

    def config(name: str) -> dict[str, Any]:
        return _read_json(path / manifest.components[name].config)

    encoders, tokenizers = [], []
    for index, name in enumerate(("text_encoder", "text_encoder_2")):
        if name not in manifest.components:
            continue
        projection = info.family == "sdxl" and index == 1  # as the eager loader builds them
        encoders.append(OnnxTextEncoder(component(name), CLIPTextConfig.from_dict(config(name)), projection))
        tokenizers.append(CLIPTokenizer.from_pretrained(path / name.replace("text_encoder", "tokenizer")))
    vae_config = FrozenDict(config("vae_decoder"))
    vae = OnnxVAE(component("vae_decoder"), component("vae_encoder"), vae_config)
    unet = OnnxUNet(component("unet"), FrozenDict(config("unet")), open_component=component)
    return LoadedModel(
        info=info,
        unet=unet,  # type: ignore[arg-type]  (answers the calls the engine makes; see the module doc)
        vae=vae,  # type: ignore[arg-type]
        text_encoders=encoders,  # type: ignore[arg-type]
        tokenizers=tokenizers,
        # export records the base's model_index.json value; True is the eager loader's default
        force_zeros_for_empty_prompt=bool(_read_json(path / "sdserve.json").get("force_zeros_for_empty_prompt", True)),
        device=torch.device("cpu"),  # sessions take host arrays
        dtype=torch.float32,  # latents and conditioning; cast to each graph's input dtype per call
        vae_dtype=torch.float32,
    )


class OnnxBackend:
    """The UNet of a compiled model in onnxruntime: one session call for every row of the batch
    (and, when rows use ControlNet units, one per unit on its rows first)."""

    name = BACKEND

    def __init__(self, controlnets: Any = None) -> None:
        self.controlnets = controlnets  # the engine's ControlNetStore: unit names resolve as at validation

    def predict_noise(self, model: LoadedModel, batch: Batch) -> torch.Tensor:
        tensors = {"sample": batch.sample, "timestep": batch.timesteps,
                   "encoder_hidden_states": batch.encoder_hidden_states}
        if batch.text_embeds is not None:
            tensors.update(text_embeds=batch.text_embeds, time_ids=batch.time_ids)
        if batch.controls:
            residuals = self._control_residuals(model, batch)
            return model.unet.graph("unet_controlled")(**tensors, **residuals)[0]  # [rows, C, h, w]
        return model.unet.component(**tensors)[0]  # [rows, C, h, w]

    def _control_residuals(self, model: LoadedModel, batch: Batch) -> dict[str, torch.Tensor]:
        """residual name -> [rows, C_k, h_k, w_k]: each unit's graph on its rows alone, times each
        row's scale, summed in the units' order; zeros for rows without a unit (the eager path's
        `controlnet.control_residuals`, which diffusers' MultiControlNetModel sums the same way)."""
        totals: list[torch.Tensor] = []
        names: list[str] = []
        for (name, _unit_index), segments in batch.controls.items():
            graph = model.unet.graph(exported_controlnet(self.controlnets, name, model.info, "controlnets").name)
            rows = torch.cat([torch.arange(s.row_start, s.row_stop) for s in segments])  # [rows_u]
            scales = torch.cat([torch.full((s.row_stop - s.row_start,), s.scale) for s in segments])  # [rows_u]
            inputs = {"sample": batch.sample[rows], "timestep": batch.timesteps[rows],
                      "encoder_hidden_states": batch.encoder_hidden_states[rows],
                      "controlnet_cond": torch.cat([s.cond for s in segments])}  # [rows_u, 3, H, W]
            if batch.text_embeds is not None:
                inputs.update(text_embeds=batch.text_embeds[rows], time_ids=batch.time_ids[rows])
            outputs = graph(**inputs)  # down-block residuals, then the mid-block one, at scale 1
            if not totals:
                totals = [torch.zeros((batch.num_rows, *out.shape[1:])) for out in outputs]
                names = graph.output_names
            for total, out in zip(totals, outputs, strict=True):
                total.index_add_(0, rows, out * scales.view(-1, 1, 1, 1))
        return dict(zip(names, totals, strict=True))


# request field -> what it carries, for the refusal below
_PER_REQUEST = (("adapters", "LoRA adapters"), ("embedding_refs", "embeddings"),
                ("hypernetwork_refs", "hypernetworks"), ("ip_adapters", "IP-Adapters"))
_FIELDS = {"embedding_refs": "embeddings", "hypernetwork_refs": "hypernetworks"}


def refuse_per_request_weights(request: EngineRequest, info: ModelInfo) -> None:
    """A compiled model serves its one fixed stack: any weights a request brings are refused,
    naming their field (`adapters` for a LoRA stack). ControlNet units were checked against the
    export's ControlNets while they were resolved (`exported_controlnet`)."""
    for attribute, what in _PER_REQUEST:
        if getattr(request, attribute):
            raise InvalidArgument(
                f"model {info.name!r} is compiled ({info.backend}) with a fixed adapter stack and serves no "
                f"per-request {what}; use the eager model, or compile a variant with them",
                field=_FIELDS.get(attribute, attribute),
            )

"""The onnxruntime backend: a directory written by `sdserve compile onnx`, served by the engine.

Only the model's calls change: the text encoder(s), the UNet and the VAE run as onnxruntime
sessions, behind objects that answer the calls the engine already makes of the torch modules
(`encoder(ids)[0]`, `.hidden_states[-2]`, `vae.decode(z)`, `vae.encode(x).latent_dist`). So the
request's schedulers, seeds, noise, guidance interval and the step-level batcher are the eager
path's own code, and a compiled model's rows batch with each other exactly as eager rows do.

A compiled model holds one fixed stack (its export's, or a refit's, in its weights): per-request
weights (LoRAs, embeddings, hypernetworks, IP-Adapters) and ControlNet units are refused at
validation (`refuse_per_request_weights`), before any work. Sessions take numpy arrays on the
host; with the CUDA or TensorRT provider each call copies in and out (no I/O binding yet).

The engine reads compile's manifest (`sdserve.compile.manifest`, `onnx_session`): both are leaf
modules that import nothing of the engine, so the one-way rule (compile -> engine) still holds
for everything that does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdserve.engine.batch import Batch
from sdserve.engine.model import LoadedModel, ModelInfo
from sdserve.engine.model_limits import ModelDefaults, ModelLimits
from sdserve.engine.request import EngineRequest
from sdserve.errors import InvalidArgument

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
    """The UNet session; `OnnxBackend` feeds it a batch's rows."""

    def __init__(self, component: OnnxComponent, config: Any) -> None:
        self.component = component
        self.config = config


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
        options = onnxruntime.SessionOptions()
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
    unet = OnnxUNet(component("unet"), FrozenDict(config("unet")))
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
    """The UNet of a compiled model in onnxruntime: one session call for every row of the batch."""

    name = BACKEND

    def predict_noise(self, model: LoadedModel, batch: Batch) -> torch.Tensor:
        if batch.controls:  # validation refuses ControlNet units for compiled models
            raise InvalidArgument("ControlNet units are not served by the onnxruntime backend", field="controlnets")
        tensors = {"sample": batch.sample, "timestep": batch.timesteps,
                   "encoder_hidden_states": batch.encoder_hidden_states}
        if batch.text_embeds is not None:
            tensors.update(text_embeds=batch.text_embeds, time_ids=batch.time_ids)
        return model.unet.component(**tensors)[0]  # [rows, C, h, w]


# request field -> what it carries, for the refusal below
_PER_REQUEST = (("adapters", "LoRA adapters"), ("embedding_refs", "embeddings"),
                ("hypernetwork_refs", "hypernetworks"), ("ip_adapters", "IP-Adapters"),
                ("controlnets", "ControlNet units"))
_FIELDS = {"embedding_refs": "embeddings", "hypernetwork_refs": "hypernetworks"}


def refuse_per_request_weights(request: EngineRequest, info: ModelInfo) -> None:
    """A compiled model serves its one fixed stack: anything a request brings is refused, naming
    its field (`adapters` for a LoRA stack)."""
    for attribute, what in _PER_REQUEST:
        if getattr(request, attribute):
            raise InvalidArgument(
                f"model {info.name!r} is compiled ({info.backend}) with a fixed adapter stack and serves no "
                f"per-request {what}; use the eager model, or compile a variant with them",
                field=_FIELDS.get(attribute, attribute),
            )

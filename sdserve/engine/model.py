"""Loading a model: its components, its family, and what requests may ask of it.

A model is a local diffusers-format directory (or a built-in name that resolves to one), or a
single-file checkpoint in the original SD layout, converted once into a cached diffusers dir
(`sdserve.models.single_file`); its VAE may come from elsewhere (`sdserve.models.vae`). Its
`sdserve.json` records the family, the defaults a request's absent fields take, and the limits;
a directory without one gets them inferred from its configs.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdserve.engine.config import EngineConfig
from sdserve.engine.model_limits import ModelDefaults, ModelLimits
from sdserve.errors import InvalidArgument, NotFound
from sdserve.models.builtin import METADATA_FILE, builtin_names, builtin_path
from sdserve.models.variants import weights_variant


@dataclass(frozen=True)
class ModelInfo:
    """What the engine and the validator need to know about a model, without its weights."""

    name: str
    path: Path
    family: str  # "sd1" | "sd2" | "sdxl"
    defaults: ModelDefaults
    limits: ModelLimits
    vae_scale_factor: int
    latent_channels: int  # the VAE's latent channels (4)
    unet_in_channels: int  # 4, or 9 for inpainting UNets (latents + mask + masked-image latents)
    scheduler_config: dict[str, Any] = field(repr=False)
    text_widths: dict[str, int] = field(default_factory=dict)  # text encoder component -> hidden size
    text_layers: dict[str, int] = field(default_factory=dict)  # text encoder component -> transformer layers
    attention_widths: tuple[int, ...] = ()  # widths of the UNet's attention contexts (self and cross)
    # The UNet's config as read once here, so validation checks conditioning models against it
    # without reading the file again (ControlNet channels, IP-Adapter cross-attention width).
    unet_config: dict[str, Any] = field(default_factory=dict, repr=False)
    description: str = ""
    backend: str = "eager"  # "onnxruntime" for a directory written by `sdserve compile onnx`
    vae: Any = None  # sdserve.models.vae.VaeSource when the VAE is not the directory's own vae/


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _infer_family(path: Path, model_index: dict[str, Any]) -> str:
    if "XL" in model_index.get("_class_name", "") or (path / "text_encoder_2").is_dir():
        return "sdxl"
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
    text = _read_json(path / "text_encoder" / "config.json")
    if scheduler.get("prediction_type") == "v_prediction" or text.get("hidden_act") == "gelu":
        return "sd2"
    return "sd1"


def read_model_info(name: str, path: Path, vae_source: Any = None) -> ModelInfo:
    """Describe the model at `path` (its VAE replaced by `vae_source`, a `VaeSource`, when given);
    NotFound if it is not a diffusers-format SD directory."""
    index_file = path / "model_index.json"
    if not index_file.is_file() or not (path / "unet" / "config.json").is_file():
        raise NotFound(f"model {name!r} is not a diffusers-format Stable Diffusion directory", field="model")
    model_index = _read_json(index_file)
    unet = _read_json(path / "unet" / "config.json")
    vae = vae_source.config if vae_source is not None else _read_json(path / "vae" / "config.json")
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    meta_file = path / METADATA_FILE
    if meta_file.is_file():
        meta = _read_json(meta_file)
        family = meta["family"]
        defaults = ModelDefaults(**meta["defaults"])
        limits = ModelLimits(**meta.get("limits", {}))
        description = meta.get("description", "")
    else:
        family = _infer_family(path, model_index)
        side = int(unet.get("sample_size", 64)) * vae_scale
        defaults = ModelDefaults(
            width=side,
            height=side,
            steps=30 if family == "sdxl" else 25,
            guidance_scale=5.0 if family == "sdxl" else 7.5,
            scheduler=scheduler_config.get("_class_name", "EulerDiscreteScheduler"),
        )
        limits = ModelLimits()
        description = f"{family} model from a local directory"
    text_widths = {
        component: int(_read_json(path / component / "config.json")["hidden_size"])
        for component in ("text_encoder", "text_encoder_2")
        if (path / component / "config.json").is_file()
    }
    text_layers = {
        component: int(_read_json(path / component / "config.json")["num_hidden_layers"])
        for component in text_widths
    }
    cross = unet.get("cross_attention_dim", 768)
    attention_widths = tuple(sorted(set(unet.get("block_out_channels", [])) | {int(cross)}))
    return ModelInfo(
        attention_widths=attention_widths,
        unet_config=unet,
        text_widths=text_widths,
        text_layers=text_layers,
        name=name,
        path=path,
        family=family,
        defaults=defaults,
        limits=limits,
        vae_scale_factor=vae_scale,
        latent_channels=int(vae.get("latent_channels", 4)),
        unet_in_channels=int(unet.get("in_channels", 4)),
        scheduler_config=scheduler_config,
        description=description,
        vae=vae_source,
    )


@dataclass
class LoadedModel:
    """A model's modules on the engine's device. Base weights are never mutated while serving."""

    info: ModelInfo
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    force_zeros_for_empty_prompt: bool
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    adapters: Any = None  # engine.residency.AdapterRuntime, attached once at load by the engine

    def adapter_components(self) -> dict[str, torch.nn.Module]:
        """The modules adapters target, under the component names adapter files use."""
        components = {"unet": self.unet, "text_encoder": self.text_encoders[0]}
        if len(self.text_encoders) > 1:
            components["text_encoder_2"] = self.text_encoders[1]
        return components


# diffusers' and transformers' from_pretrained patch torch globally while they build modules
# (torch.nn.init skipped, accelerate's init_empty_weights putting new parameters on "meta"): two
# threads building modules at once can leave one with empty weights. Every load that builds
# modules (base models here, ControlNets and IP-Adapters in the store's loader thread) holds this.
MODULE_BUILD_LOCK = threading.RLock()


def load_model(info: ModelInfo, device: torch.device, dtype: torch.dtype, attention: str = "sdpa") -> LoadedModel:
    """`attention`: the UNet's attention backend (EngineConfig.attention, engine/attention_backend.py)."""
    with MODULE_BUILD_LOCK:
        loaded = _load_model(info, device, dtype)
    if attention != "sdpa":
        from sdserve.engine.attention_backend import install_attention

        install_attention(loaded.unet, attention)
    return loaded


def _load_model(info: ModelInfo, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = info.path

    def variant(component: str) -> str | None:
        # A dir of `*.fp16.safetensors` only loads with variant="fp16"; found from its files.
        return weights_variant(path / component)

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, variant=variant("unet"))
    # diffusers upcasts SDXL's VAE to float32 when it runs in float16 (force_upcast); we keep it
    # there for good, which is the same math without casting back and forth every decode.
    vae_config = info.vae.config if info.vae is not None else _read_json(path / "vae" / "config.json")
    force_upcast = vae_config.get("force_upcast", True)
    vae_dtype = torch.float32 if (dtype == torch.float16 and force_upcast) else dtype
    if info.vae is not None:
        from sdserve.models.vae import load_vae

        vae = load_vae(info.vae, vae_dtype)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype, variant=variant("vae"))
    encoders: list[torch.nn.Module] = [
        CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, variant=variant("text_encoder"))
    ]
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
    if info.family == "sdxl":
        encoders.append(
            CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", dtype=dtype, variant=variant("text_encoder_2")
            )
        )
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
    for module in (unet, vae, *encoders):
        module.to(device).eval().requires_grad_(False)
    model_index = _read_json(path / "model_index.json")
    return LoadedModel(
        info=info,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        force_zeros_for_empty_prompt=bool(model_index.get("force_zeros_for_empty_prompt", True)),
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
    )


class ModelStore:
    """Names -> models. Built-in names, local directories and single-file checkpoints; weights
    load once, on first use. `vaes` maps a model name to the VAE (file or directory) it uses
    instead of its own."""

    def __init__(
        self, config: EngineConfig, default_model: str = "default", vaes: dict[str, str] | None = None
    ) -> None:
        self.config = config
        self.default_model = default_model
        self.vaes = dict(vaes or {})
        self._infos: dict[str, ModelInfo] = {}
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def resolve_name(self, name: str) -> str:
        return name or self.default_model

    def info(self, name: str) -> ModelInfo:
        name = self.resolve_name(name)
        with self._lock:
            if name not in self._infos:
                self._infos[name] = self._describe(name)
            return self._infos[name]

    def _describe(self, name: str) -> ModelInfo:
        if name in builtin_names():
            return self._with_vae(name, builtin_path(name))
        path = Path(name).expanduser()
        if path.is_dir():
            from sdserve.engine.onnx_backend import is_compiled_dir, read_onnx_model_info

            if is_compiled_dir(path):  # written by `sdserve compile onnx`: served by onnxruntime
                if name in self.vaes:  # its VAE is a graph of the export, not a module to swap
                    raise InvalidArgument("a separate VAE does not apply to an ONNX export; export the "
                                          "model with that VAE instead", field="vae")
                return read_onnx_model_info(name, path.resolve())
            return self._with_vae(name, path.resolve())
        from sdserve.models.single_file import converted_dir, is_single_file

        if is_single_file(path):  # the original SD layout: converted once, cached by sha256
            return self._with_vae(name, converted_dir(path.resolve()))
        # Do not echo the name back as a path: it may be a server path the caller probed for.
        raise NotFound("unknown model; see `sdserve models list`", field="model")

    def _with_vae(self, name: str, path: Path) -> ModelInfo:
        vae = self.vaes.get(name)
        if vae is None:
            return read_model_info(name, path)
        from sdserve.models.vae import resolve_vae

        return read_model_info(name, path, resolve_vae(vae, path))

    def get(self, name: str) -> LoadedModel:
        info = self.info(name)
        with self._lock:
            if info.name not in self._loaded:
                if info.backend == "onnxruntime":
                    from sdserve.engine.onnx_backend import load_onnx_model

                    self._loaded[info.name] = load_onnx_model(info)
                else:
                    self._loaded[info.name] = load_model(
                        info, self.config.torch_device(), self.config.torch_dtype(), self.config.attention
                    )
            return self._loaded[info.name]

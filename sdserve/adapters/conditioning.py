"""ControlNets and IP-Adapters as one uploadable safetensors file: pack, check, unpack.

An upload is one safetensors file (one stream, one size limit, one sha256, one content-addressed
blob: the registry's whole model). The conditioning models are directories, so they travel packed:

- **ControlNet** (a diffusers ControlNet dir: `config.json` + `diffusion_pytorch_model.safetensors`,
  what `sdserve train controlnet` writes): the weights file's tensors unchanged, and in the header
  metadata `sdserve_pack = "controlnet"`, `sdserve_pack_version = "1"` and `sdserve_config` = the
  text of `config.json`.
- **IP-Adapter** (`ip_adapter.safetensors` + `image_encoder/`, what `sdserve train ip-adapter`
  writes and diffusers' `load_ip_adapter` reads): `ip_adapter.safetensors`' tensors unchanged
  (`image_proj.*`, `ip_adapter.N.to_k_ip/to_v_ip.weight`), the image encoder's
  `model.safetensors` tensors under the prefix `image_encoder.`, and in the metadata
  `sdserve_pack = "ip_adapter"`, `sdserve_pack_version = "1"` and `sdserve_image_encoder_config`
  = the text of `image_encoder/config.json`.

The packed file keeps the original weights file's own metadata (the trainers' provenance) beside
the pack's keys. `unpack` writes the directory back as the engine and diffusers read it: the same
tensors bit for bit and the configs text for text; for weights files written by the safetensors
library (diffusers' and transformers' save_pretrained) the files come back byte for byte, so the
unpacked directory has the original's digest and the engine's residency store (keyed by it)
holds one copy for an uploaded model and the same model configured by the operator.

`check_controlnet` / `check_ip_adapter` are what the server's upload-check worker runs against
each served model (its facts: `model_facts`): they read the file with the hardened reader, never
run its contents, and build the model the file claims to be on torch's meta device (no memory,
no weights) to compare every key and shape with the file, so a file the server accepts is one
`from_pretrained` loads without a missing or unexpected key. A file that does not fit a model
raises AdapterError (a misfit, the verdict for that model); a file that is not a pack of the kind
at all raises InvalidArgument naming "data".

Like the rest of this package this imports nothing of sdserve but `sdserve.errors` (and reads
diffusers / transformers lazily, in the functions that build the models).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdserve.adapters.reader import Source, read_safetensors
from sdserve.errors import AdapterError, InvalidArgument

CONTROLNET = "controlnet"
IP_ADAPTER = "ip_adapter"
KINDS = (CONTROLNET, IP_ADAPTER)

PACK_KEY = "sdserve_pack"  # metadata: which kind of directory the file packs
VERSION_KEY = "sdserve_pack_version"
PACK_VERSION = "1"
CONFIG_KEY = "sdserve_config"  # a ControlNet's config.json
ENCODER_CONFIG_KEY = "sdserve_image_encoder_config"  # an IP-Adapter's image_encoder/config.json
ENCODER_PREFIX = "image_encoder."

CONTROLNET_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name, what from_pretrained reads
IP_ADAPTER_WEIGHTS = "ip_adapter.safetensors"
ENCODER_DIR = "image_encoder"
ENCODER_WEIGHTS = "model.safetensors"  # transformers' name
CONFIG_FILE = "config.json"
MAX_CONFIG_CHARS = 64 * 1024  # a config.json is ~2 KB; the header's own limit bounds it anyway

# A ControlNet's and its UNet's must agree (the engine's ControlNet store checks the same keys).
FITTING_KEYS = ("cross_attention_dim", "block_out_channels")
# diffusers' ControlNetModel default: three stride-2 convs take a control image down 8x.
DEFAULT_CONDITIONING_CHANNELS = (16, 32, 96, 256)


# -- packing (the client side) ---------------------------------------------------------------------


def pack_controlnet(directory: str | os.PathLike[str]) -> bytes:
    """The packed file of a diffusers ControlNet directory (see the module docstring)."""
    directory = Path(directory)
    weights = directory / CONTROLNET_WEIGHTS
    config = directory / CONFIG_FILE
    _require_files(directory, "a diffusers ControlNet directory", config, weights)
    raw = read_safetensors(str(weights), weights.name)
    metadata = {**raw.metadata, PACK_KEY: CONTROLNET, VERSION_KEY: PACK_VERSION,
                CONFIG_KEY: _config_text(config)}
    return _save(raw.tensors, metadata)


def pack_ip_adapter(directory: str | os.PathLike[str]) -> bytes:
    """The packed file of an IP-Adapter directory (`ip_adapter.safetensors` + `image_encoder/`)."""
    directory = Path(directory)
    weights = directory / IP_ADAPTER_WEIGHTS
    encoder_config = directory / ENCODER_DIR / CONFIG_FILE
    encoder_weights = directory / ENCODER_DIR / ENCODER_WEIGHTS
    _require_files(directory, "an IP-Adapter directory", weights, encoder_config, encoder_weights)
    adapter = read_safetensors(str(weights), weights.name)
    encoder = read_safetensors(str(encoder_weights), f"{ENCODER_DIR}/{ENCODER_WEIGHTS}")
    stray = [key for key in adapter.tensors if key.startswith(ENCODER_PREFIX)]
    if stray:
        raise InvalidArgument(f"{weights} has a tensor {stray[0]!r} under the prefix the pack reserves for "
                              "the image encoder", field="directory")
    tensors = {**adapter.tensors, **{ENCODER_PREFIX + key: value for key, value in encoder.tensors.items()}}
    metadata = {**adapter.metadata, PACK_KEY: IP_ADAPTER, VERSION_KEY: PACK_VERSION,
                ENCODER_CONFIG_KEY: _config_text(encoder_config)}
    return _save(tensors, metadata)


def pack(kind: str, directory: str | os.PathLike[str]) -> bytes:
    """`pack_controlnet` or `pack_ip_adapter` by kind ("controlnet", "ip_adapter")."""
    if kind == CONTROLNET:
        return pack_controlnet(directory)
    if kind == IP_ADAPTER:
        return pack_ip_adapter(directory)
    raise InvalidArgument(f"only {' and '.join(KINDS)} directories are packed, not {kind!r}", field="kind")


def _require_files(directory: Path, what: str, *files: Path) -> None:
    if not directory.is_dir():
        raise InvalidArgument(f"{directory} is not a directory; expected {what}", field="directory")
    missing = [str(file.relative_to(directory)) for file in files if not file.is_file()]
    if missing:
        raise InvalidArgument(f"{directory} is not {what}: it has no {', '.join(missing)} "
                              "(sharded or .bin weights are not packed; save with safe_serialization)",
                              field="directory")


def _config_text(path: Path) -> str:
    """The config file's text, checked to be one JSON object (so a pack never carries a broken one)."""
    text = path.read_text()
    if len(text) > MAX_CONFIG_CHARS or not isinstance(_json_object(text), dict):
        raise InvalidArgument(f"{path} is not a JSON object of at most {MAX_CONFIG_CHARS} characters",
                              field="directory")
    return text


def _save(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    import safetensors.torch

    return safetensors.torch.save({key: value.contiguous() for key, value in tensors.items()}, metadata=metadata)


# -- reading a pack (the server side) --------------------------------------------------------------


def read_pack(source: Source, name: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """(tensors, metadata, config) of a packed file of `kind`; InvalidArgument(field "data") for a
    file that is not one (another kind, no pack keys, a config that is not a JSON object). The
    config is the ControlNet's or the image encoder's."""
    raw = read_safetensors(source, name)
    packed = raw.metadata.get(PACK_KEY)
    if packed != kind:
        what = f"a packed {packed}" if packed in KINDS else "not a packed directory"
        command = "controlnet" if kind == CONTROLNET else "ip-adapter"
        raise InvalidArgument(f"adapter {name!r} is {what}, not a packed {kind} "
                              f"(make one with `sdserve adapters pack {command} DIR --out FILE`)", field="data")
    if raw.metadata.get(VERSION_KEY) != PACK_VERSION:
        raise InvalidArgument(f"adapter {name!r}: pack version {str(raw.metadata.get(VERSION_KEY))[:16]!r} is not "
                              f"{PACK_VERSION!r}, the one this server reads", field="data")
    config = _json_object(raw.metadata.get(CONFIG_KEY if kind == CONTROLNET else ENCODER_CONFIG_KEY, ""))
    if not isinstance(config, dict):
        raise InvalidArgument(f"adapter {name!r}: the packed config is not a JSON object", field="data")
    return raw.tensors, raw.metadata, config


def unpack(source: Source, name: str, kind: str, out: str | os.PathLike[str]) -> Path:
    """Write the directory a packed file of `kind` holds to `out` (which must not exist), as the
    engine and diffusers read it; staged beside `out` and renamed into place whole, so a reader
    never sees half a directory. Returns `out`."""
    import safetensors.torch

    out = Path(out)
    tensors, metadata, _ = read_pack(source, name, kind)
    # The config as the directory had it, text for text (read_pack checked it is a JSON object).
    config_text = metadata[CONFIG_KEY if kind == CONTROLNET else ENCODER_CONFIG_KEY]
    own = {key: value for key, value in metadata.items() if key not in (PACK_KEY, VERSION_KEY, CONFIG_KEY,
                                                                        ENCODER_CONFIG_KEY)}
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if kind == CONTROLNET:
            (staging / CONFIG_FILE).write_text(config_text)
            safetensors.torch.save_file(tensors, str(staging / CONTROLNET_WEIGHTS), metadata=own or None)
        else:
            encoder = {key.removeprefix(ENCODER_PREFIX): value for key, value in tensors.items()
                       if key.startswith(ENCODER_PREFIX)}
            adapter = {key: value for key, value in tensors.items() if not key.startswith(ENCODER_PREFIX)}
            (staging / ENCODER_DIR).mkdir()
            (staging / ENCODER_DIR / CONFIG_FILE).write_text(config_text)
            # transformers refuses a safetensors file whose metadata names no framework.
            safetensors.torch.save_file(encoder, str(staging / ENCODER_DIR / ENCODER_WEIGHTS),
                                        metadata={"format": "pt"})
            safetensors.torch.save_file(adapter, str(staging / IP_ADAPTER_WEIGHTS), metadata=own or None)
        staging.chmod(0o755)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# -- checking a pack against a served model (in the upload-check worker) ----------------------------


def model_facts(name: str, family: str, backend: str, unet_config: Mapping[str, Any], vae_scale_factor: int,
                unet_in_channels: int) -> dict[str, Any]:
    """What the checks need to know of a served model, as plain (picklable) values."""
    return {"name": name, "family": family, "backend": backend, "unet_config": dict(unet_config),
            "vae_scale_factor": int(vae_scale_factor), "unet_in_channels": int(unet_in_channels)}


def check_controlnet(source: Source, name: str, facts: Mapping[str, Any]) -> None:
    """Accept a packed ControlNet that `from_pretrained` loads as made for the model `facts`
    describes; AdapterError (why not) if it was made for another, InvalidArgument if it is no pack."""
    tensors, _, config = read_pack(source, name, CONTROLNET)
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise InvalidArgument(f"adapter {name!r}: the packed config is a {str(config['_class_name'])[:40]!r}, "
                              "not a ControlNetModel", field="data")
    if facts["backend"] != "eager":
        raise AdapterError(name, "a compiled model serves only the ControlNets exported with it")
    unet = facts["unet_config"]
    for key in FITTING_KEYS:
        ours, theirs = _plain(config.get(key)), _plain(unet.get(key))
        if ours != theirs:
            raise AdapterError(name, f"was made for another base model ({key} {str(ours)[:40]} vs {theirs})")
    channels = config.get("conditioning_embedding_out_channels") or DEFAULT_CONDITIONING_CHANNELS
    stride = 2 ** (len(channels) - 1) if isinstance(channels, list | tuple) else None
    if stride != facts["vae_scale_factor"]:
        raise AdapterError(name, f"takes control images down {stride}x but the base model's VAE scale is "
                                 f"{facts['vae_scale_factor']}x (conditioning_embedding_out_channels)")
    if facts["unet_in_channels"] != 4:
        raise AdapterError(name, "ControlNet units are not served with inpainting UNets")
    if config.get("in_channels", 4) != 4:
        raise AdapterError(name, f"takes {str(config.get('in_channels'))[:16]} latent channels, not 4")

    from diffusers import ControlNetModel

    expected = _meta_shapes(lambda: ControlNetModel.from_config(config), name)
    _compare(name, expected, tensors, "ControlNet")


def check_ip_adapter(source: Source, name: str, facts: Mapping[str, Any]) -> None:
    """Accept a packed plain IP-Adapter (image projection, per-layer to_k_ip/to_v_ip, CLIP vision
    encoder) whose every tensor fits the model `facts` describes and its own encoder."""
    tensors, _, encoder_config = read_pack(source, name, IP_ADAPTER)
    if facts["backend"] != "eager":
        raise AdapterError(name, "IP-Adapters are served on eager models only")
    cross = facts["unet_config"].get("cross_attention_dim")
    proj = tensors.get("image_proj.proj.weight")
    if proj is None:
        raise AdapterError(name, "only plain IP-Adapter models (image_proj.proj) are served")
    if proj.ndim != 2 or not isinstance(cross, int) or proj.shape[0] % cross or proj.shape[0] == 0:
        raise AdapterError(name, f"was made for another base model (image projection {tuple(proj.shape)}, "
                                 f"cross-attention {cross})")
    projection_dim = encoder_config.get("projection_dim")
    if proj.shape[1] != projection_dim:
        raise AdapterError(name, f"its image projection reads {proj.shape[1]} features; its image encoder "
                                 f"projects to {str(projection_dim)[:16]}")
    expected = {"image_proj.proj.weight": tuple(proj.shape), "image_proj.proj.bias": (proj.shape[0],),
                "image_proj.norm.weight": (cross,), "image_proj.norm.bias": (cross,)}
    for index, width in enumerate(_cross_attention_widths(facts["unet_config"], name)):
        for part in ("to_k_ip", "to_v_ip"):
            expected[f"ip_adapter.{2 * index + 1}.{part}.weight"] = (width, cross)
    adapter = {key: value for key, value in tensors.items() if not key.startswith(ENCODER_PREFIX)}
    _compare(name, expected, adapter, "IP-Adapter")

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    def build() -> torch.nn.Module:
        config = CLIPVisionConfig.from_dict({k: v for k, v in encoder_config.items() if not k.startswith("_")})
        return CLIPVisionModelWithProjection(config)

    encoder = {key.removeprefix(ENCODER_PREFIX): value for key, value in tensors.items()
               if key.startswith(ENCODER_PREFIX)}
    _compare(name, _meta_shapes(build, name), encoder, "image encoder")


def _import_model_classes() -> None:
    """Import the model classes the checks build (diffusers' lazy modules load on first access)."""
    from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: F401


# What the upload-check worker runs before a check's time limit starts (server/upload_check.py).
check_controlnet.worker_prepare = _import_model_classes  # type: ignore[attr-defined]
check_ip_adapter.worker_prepare = _import_model_classes  # type: ignore[attr-defined]


def _cross_attention_widths(unet_config: Mapping[str, Any], name: str) -> list[int]:
    """The output width of every cross-attention layer's to_k, in `unet.attn_processors` order
    (diffusers numbers an IP-Adapter's layers 1, 3, 5, ... in that order), from a meta UNet."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    return [unet.get_submodule(layer.removesuffix(".processor")).to_k.out_features
            for layer in unet.attn_processors if layer.endswith("attn2.processor")]


def _meta_shapes(build: Any, name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of the model `build()` makes on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            module = build()
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError, RuntimeError) as exc:
        raise AdapterError(name, f"its config does not build a model ({type(exc).__name__})") from None
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _compare(name: str, expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, torch.Tensor],
             what: str) -> None:
    """Every expected key present with its shape and floating point, and no other key."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(name, f"the {what} has no tensor {missing[0]!r} ({len(missing)} missing)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterError(name, f"the {what} has a tensor {extra[0][:80]!r} its config does not make "
                                 f"({len(extra)} such)")
    for key, shape in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            raise AdapterError(name, f"{key[:80]} has shape {tuple(tensor.shape)}, the model needs {shape}")
        if not tensor.dtype.is_floating_point:
            raise AdapterError(name, f"{key[:80]} is {tensor.dtype}, not a floating-point tensor")


def pack_kind(path: str | os.PathLike[str]) -> str | None:
    """The kind a safetensors file packs ("controlnet", "ip_adapter"), from its header alone; None
    for any other file (not a pack, or not readable as safetensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            kind = (handle.metadata() or {}).get(PACK_KEY)
    except Exception:  # safetensors' own error types: not a safetensors file, which describe() reports
        return None
    return kind if kind in KINDS else None


def summary(source: Source, name: str, kind: str) -> dict[str, Any]:
    """What `sdserve adapters inspect` reports about a pack: its kind, tensors, targets (as
    ListAdapters lists them) and the config facts the server checks it by."""
    tensors, metadata, config = read_pack(source, name, kind)
    report: dict[str, Any] = {"kind": kind, "tensors": len(tensors),
                              "targets": listing(source, name, kind)["targets"],
                              "mib": round(sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20, 2)}
    if kind == CONTROLNET:
        channels = config.get("conditioning_embedding_out_channels") or DEFAULT_CONDITIONING_CHANNELS
        report.update({key: config.get(key) for key in FITTING_KEYS})
        report["conditioning_stride"] = 2 ** (len(channels) - 1) if isinstance(channels, list | tuple) else None
    else:
        proj = tensors.get("image_proj.proj.weight")
        norm = tensors.get("image_proj.norm.weight")
        report["cross_attention_dim"] = int(norm.shape[0]) if norm is not None and norm.ndim == 1 else None
        if proj is not None and proj.ndim == 2 and report["cross_attention_dim"]:
            report["image_tokens"] = int(proj.shape[0]) // report["cross_attention_dim"]
        report["image_encoder"] = {key: encoder_value for key in ("hidden_size", "num_hidden_layers", "image_size",
                                                                   "projection_dim")
                                   if (encoder_value := config.get(key)) is not None}
    report["metadata"] = {key: value[:200] for key, value in sorted(metadata.items())
                          if key not in (CONFIG_KEY, ENCODER_CONFIG_KEY)}
    return report


def listing(source: Source, name: str, kind: str) -> dict[str, str | int | float]:
    """The listing report of a checked pack (`inspect.Listing` values): targets = the ControlNet's
    residuals (its zero convs: one per down-block output, and the mid block's), or the
    IP-Adapter's cross-attention layers; form "" and rank 0."""
    tensors, _, _ = read_pack(source, name, kind)
    if kind == CONTROLNET:
        targets = sum(1 for key in tensors if key.startswith("controlnet_down_blocks.") and key.endswith(".weight"))
        targets += "controlnet_mid_block.weight" in tensors
    else:
        targets = sum(1 for key in tensors if key.startswith("ip_adapter.") and key.endswith(".to_k_ip.weight"))
    return {"form": "", "rank": 0, "targets": targets, "slider_scales": "", "slider_start": 0.0}


def _plain(value: Any) -> Any:
    """JSON lists and tuples compare equal (a config read back has lists)."""
    return list(value) if isinstance(value, tuple) else value


def _json_object(text: str) -> Any:
    try:
        return json.loads(text) if text and len(text) <= MAX_CONFIG_CHARS else None
    except ValueError:
        return None

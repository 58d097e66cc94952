"""Offline conversion of AUTOMATIC1111 pickle files (`.pt`, `.bin`) to safetensors.

Pickles are read with `torch.load(weights_only=True, map_location="cpu")` only: tensors and
plain containers, no code. A file that weights-only loading refuses is refused; it is never
unpickled fully. This runs from the CLI (`sdserve adapters convert`), never while serving.

Embeddings
    A1111 `{"string_to_param": {"*": [n, dim]}, "name": str, ...}` or diffusers' `.bin`
    `{token: [n, dim]}` -> diffusers layout `{token: [n, dim]}`. The token is the file's `name`
    (what diffusers' `load_textual_inversion` uses for A1111 files) unless one is given. SDXL
    `{"clip_l", "clip_g"}` files keep their layout.

Hypernetworks
    A1111 `{width (int): (k_state_dict, v_state_dict), "layer_structure": [1, 2, 1],
    "activation_func": str | None, "is_layer_norm": bool, "activate_output": bool,
    "use_dropout", "dropout_structure", "last_layer_dropout", "name", "sd_checkpoint", ...}`.
    Each state dict is A1111's `HypernetworkModule.linear` (a torch Sequential):
    `linear.{j}.weight/bias` where j counts Linear, activation, LayerNorm and Dropout entries in
    order; Linear weights are 2-D and LayerNorm weights 1-D, which is how layers are told apart
    here (dropout has no parameters and does nothing at inference). Very old files name them
    `linear1`/`linear2`. Written as (see `sdserve.adapters.hypernetwork`):

        hypernetwork.{width}.{k|v}.{i}.weight / .bias            the i-th Linear
        hypernetwork.{width}.{k|v}.{i}.norm.weight / .norm.bias  the LayerNorm after it
        metadata "sdserve_hypernetwork": {"format": 1, "layer_structure", "activation",
                                          "activate_output", "layer_norm"}

    The A1111 formula it keeps: `x + MLP(x) · strength`, MLP = per layer Linear, activation
    (all but the last unless activate_output), LayerNorm (if is_layer_norm).
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from typing import Any, Literal

import safetensors.torch
import torch

from sdserve.adapters.formats.common import short
from sdserve.adapters.hypernetwork import (
    ACTIVATIONS,
    key_of,
    load_hypernetwork,
    looks_like_pickle,
    metadata_of,
)
from sdserve.errors import AdapterError

Kind = Literal["embedding", "hypernetwork"]
_SEQUENTIAL_KEY = re.compile(r"linear\.(\d+)\.(weight|bias)")
_OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
             "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


def load_pickle_weights(path: str | os.PathLike[str], name: str) -> Any:
    """`torch.load` restricted to tensors and plain data; any refusal is one AdapterError."""
    if not os.path.isfile(path):
        raise AdapterError(name, "file could not be read")
    if not looks_like_pickle(path):  # neither torch's zip nor a bare pickle
        raise AdapterError(name, "not a readable PyTorch file")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        # torch reports refused globals and unreadable opcodes alike; both mean "not plain weights".
        raise AdapterError(name, "holds Python objects besides tensors and plain data, so weights-only "
                                 "loading refused it; it is not converted (full unpickling could run code)") from None
    except OSError:
        raise AdapterError(name, "file could not be read") from None
    except Exception:
        raise AdapterError(name, "not a readable PyTorch file") from None


def detect_kind(obj: Any, name: str) -> Kind:
    if isinstance(obj, Mapping):
        if any(isinstance(key, int) and not isinstance(key, bool) for key in obj):
            return "hypernetwork"
        if "string_to_param" in obj or set(obj) <= {"clip_l", "clip_g"} or (
            len(obj) == 1 and isinstance(next(iter(obj.values())), torch.Tensor)
        ):
            return "embedding"
    raise AdapterError(name, "neither an A1111 embedding nor an A1111 hypernetwork")


def convert_embedding(obj: Any, name: str, token: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the diffusers-layout (or SDXL-layout) safetensors file for an embedding."""
    if not isinstance(obj, Mapping):
        raise AdapterError(name, "not an A1111 embedding")
    if obj and set(obj) <= {"clip_l", "clip_g"}:
        tensors = {key: _tensor(name, key, value) for key, value in obj.items()}
        return {key: value.contiguous() for key, value in tensors.items()}
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, Mapping) or set(params) != {"*"}:
            raise AdapterError(name, "string_to_param must hold exactly one '*' tensor")
        vectors = _tensor(name, "string_to_param", params["*"])
        file_token = obj.get("name")
    elif len(obj) == 1:
        file_token, value = next(iter(obj.items()))
        vectors = _tensor(name, str(file_token), value)
    else:
        raise AdapterError(name, "not an A1111 embedding (no string_to_param)")
    token = token if token is not None else file_token
    if not isinstance(token, str) or not token or any(ch.isspace() for ch in token):
        raise AdapterError(name, f"the embedding's name {short(str(token), 60)!r} is not a usable token; "
                                 "give one with --token")
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)  # [dim] -> [1, dim]
    if vectors.ndim != 2:
        raise AdapterError(name, f"embedding has shape {list(vectors.shape)}, expected [vectors, width]")
    return {token: vectors.detach().clone().contiguous()}


def _tensor(name: str, where: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise AdapterError(name, f"{short(where, 60)!r} is not a floating-point tensor")
    return value.detach()


def _layers(name: str, where: str, state: Any) -> list[tuple[torch.Tensor, torch.Tensor, tuple | None]]:
    """[(weight, bias, (norm_weight, norm_bias) | None)] of one A1111 Sequential, in order."""
    if not isinstance(state, Mapping):
        raise AdapterError(name, f"{where}: not a module state dict")
    state = {_OLD_KEYS.get(key, key): value for key, value in state.items()}
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _SEQUENTIAL_KEY.fullmatch(str(key))
        if match is None:
            raise AdapterError(name, f"{where}: unexpected key {short(str(key), 60)!r}")
        entries.setdefault(int(match[1]), {})[match[2]] = _tensor(name, f"{where}.{key}", value)
    layers: list[list[Any]] = []
    for index in sorted(entries):
        entry = entries[index]
        if set(entry) != {"weight", "bias"}:
            raise AdapterError(name, f"{where}: linear.{index} needs a weight and a bias")
        if entry["weight"].ndim == 2:
            layers.append([entry["weight"], entry["bias"], None])
        elif entry["weight"].ndim == 1 and layers and layers[-1][2] is None:
            layers[-1][2] = (entry["weight"], entry["bias"])
        else:
            raise AdapterError(name, f"{where}: linear.{index} is neither a Linear nor a LayerNorm after one")
    return [(w, b, n) for w, b, n in layers]


def convert_hypernetwork(obj: Any, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of sdserve's hypernetwork safetensors file for an A1111 one."""
    if not isinstance(obj, Mapping):
        raise AdapterError(name, "not an A1111 hypernetwork")
    structure = obj.get("layer_structure") or [1, 2, 1]
    if not isinstance(structure, list | tuple) or not all(
        isinstance(s, int | float) and not isinstance(s, bool) for s in structure
    ):
        raise AdapterError(name, "layer_structure must be a list of numbers")
    activation = obj.get("activation_func") or "linear"
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise AdapterError(name, f"activation {short(str(activation), 40)!r} is not supported")
    layer_norm = bool(obj.get("is_layer_norm", False))
    activate_output = bool(obj.get("activate_output", False))

    tensors: dict[str, torch.Tensor] = {}
    widths = sorted(key for key in obj if isinstance(key, int) and not isinstance(key, bool))
    if not widths:
        raise AdapterError(name, "hypernetwork holds no modules")
    for width in widths:
        pair = obj[width]
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise AdapterError(name, f"width {width}: expected a (k, v) pair of modules")
        for side, state in zip("kv", pair):
            layers = _layers(name, f"width {width} {side}", state)
            if len(layers) != len(structure) - 1:
                raise AdapterError(name, f"width {width} {side}: {len(layers)} linear layers, "
                                         f"layer_structure {list(structure)} needs {len(structure) - 1}")
            for i, (weight, bias, norm) in enumerate(layers):
                if (norm is not None) != layer_norm:
                    raise AdapterError(name, f"width {width} {side}: layer norms do not match is_layer_norm")
                tensors[key_of(width, side, i, "weight")] = weight.clone().contiguous()
                tensors[key_of(width, side, i, "bias")] = bias.clone().contiguous()
                if norm is not None:
                    tensors[key_of(width, side, i, "norm.weight")] = norm[0].clone().contiguous()
                    tensors[key_of(width, side, i, "norm.bias")] = norm[1].clone().contiguous()
    metadata = {"sdserve_hypernetwork": metadata_of(list(structure), activation.lower(), activate_output, layer_norm)}
    return tensors, metadata


def convert_file(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    kind: Kind | None = None,
    token: str | None = None,
    name: str | None = None,
) -> Kind:
    """Convert one A1111 pickle to safetensors at `destination` (written atomically); return its kind.

    The written hypernetwork is read back with the serving loader, so a file that converts loads.
    """
    name = name or os.path.basename(os.fspath(source))
    obj = load_pickle_weights(source, name)
    found = detect_kind(obj, name)
    if kind is not None and kind != found:
        raise AdapterError(name, f"holds a {found}, not a {kind}")
    if found == "embedding":
        tensors, metadata = convert_embedding(obj, name, token), {}
    else:
        tensors, metadata = convert_hypernetwork(obj, name)
    data = safetensors.torch.save(tensors, metadata=metadata or None)
    if found == "hypernetwork":
        load_hypernetwork(data, os.path.basename(os.fspath(destination)))
    directory = os.path.dirname(os.path.abspath(destination))
    handle, staging = tempfile.mkstemp(prefix=".convert-", suffix=".safetensors", dir=directory)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(staging, destination)
    except BaseException:
        if os.path.exists(staging):
            os.unlink(staging)
        raise
    return found

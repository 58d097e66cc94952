"""Hypernetworks (AUTOMATIC1111's kind): small MLPs on the attention context before to_k / to_v.

For every attention layer whose context width `w` has a module pair (k_mlp, v_mlp):

    k = to_k(c + k_mlp(c) · strength)        v = to_v(c + v_mlp(c) · strength)

with c the layer's context (the text embeddings in cross-attention, the hidden states in
self-attention; A1111 keys the pairs by that width, e.g. 768, 320, 640, 1280 for SD 1.x).
Each MLP is A1111's `HypernetworkModule.linear` at inference (dropout off):

    h_0 = c;  for layer i of L:  h_{i+1} = norm_i(act_i(W_i h_i + b_i))
    act_i = activation if (i < L - 1 or activate_output) else identity
    norm_i = LayerNorm(eps 1e-5, affine) if layer_norm else identity

W_i is `[int(w·s_{i+1}), int(w·s_i)]` for the layer structure s (s_0 = s_L = 1). Activations
as A1111 names them: linear (none), relu, leakyrelu (slope 0.01), elu, swish (A1111 maps it to
Hardswish), tanh, sigmoid, and torch's gelu, silu, mish, softplus, selu, celu, hardswish,
relu6, softsign, hardtanh, logsigmoid, tanhshrink. Several hypernetworks apply in sequence.

File layout (safetensors, written by `sdserve adapters convert` from A1111 `.pt` files):

    hypernetwork.{width}.{k|v}.{i}.weight       [out_i, in_i]
    hypernetwork.{width}.{k|v}.{i}.bias         [out_i]
    hypernetwork.{width}.{k|v}.{i}.norm.weight  [out_i]   (only with layer_norm)
    hypernetwork.{width}.{k|v}.{i}.norm.bias    [out_i]
    metadata "sdserve_hypernetwork": JSON {"format": 1, "layer_structure": [1, 2, 1],
        "activation": "relu", "activate_output": false, "layer_norm": false}
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch.nn import functional as F

from sdserve.adapters.formats.common import short
from sdserve.adapters.reader import Source, read_safetensors
from sdserve.errors import AdapterError

METADATA_KEY = "sdserve_hypernetwork"
FORMAT_VERSION = 1
PREFIX = "hypernetwork."
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
PICKLE_PROBLEM = "is a pickle file; convert it offline with `sdserve adapters convert`"
MAX_LAYERS = 16
MAX_EXPANSION = 16.0  # largest layer_structure entry: a hidden layer of 16x the context width

ACTIVATIONS: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = MappingProxyType({
    "linear": lambda x: x,
    "relu": F.relu,
    "leakyrelu": F.leaky_relu,
    "elu": F.elu,
    "swish": F.hardswish,  # A1111: "swish": torch.nn.Hardswish
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "silu": F.silu,
    "mish": F.mish,
    "softplus": F.softplus,
    "selu": F.selu,
    "celu": F.celu,
    "hardswish": F.hardswish,
    "relu6": F.relu6,
    "softsign": F.softsign,
    "hardtanh": F.hardtanh,
    "logsigmoid": F.logsigmoid,
    "tanhshrink": F.tanhshrink,
})

_KEY = re.compile(r"hypernetwork\.(\d+)\.([kv])\.(\d+)\.(weight|bias|norm\.weight|norm\.bias)")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class HypernetworkMLP:
    """One MLP (the k or the v side of a width). Tensors are never modified in place."""

    weights: tuple[torch.Tensor, ...] = field(repr=False)  # per layer [out_i, in_i]
    biases: tuple[torch.Tensor, ...] = field(repr=False)  # per layer [out_i]
    norms: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = field(repr=False)  # per layer ([out_i], [out_i])
    activation: str
    activate_output: bool

    def __call__(self, context: torch.Tensor) -> torch.Tensor:
        """The MLP's output (without the residual): [..., width] -> [..., width]."""
        act = ACTIVATIONS[self.activation]
        hidden = context
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            hidden = F.linear(hidden, weight, bias)  # [..., out_i]
            if i < last or self.activate_output:
                hidden = act(hidden)
            if self.norms is not None:
                norm_weight, norm_bias = self.norms[i]
                hidden = F.layer_norm(hidden, (hidden.shape[-1],), norm_weight, norm_bias, eps=1e-5)
        return hidden

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> HypernetworkMLP:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        norms = None if self.norms is None else tuple((move(w), move(b)) for w, b in self.norms)
        return HypernetworkMLP(tuple(map(move, self.weights)), tuple(map(move, self.biases)), norms,
                               self.activation, self.activate_output)


@dataclass(frozen=True)
class Hypernetwork:
    """A validated hypernetwork: a (k_mlp, v_mlp) pair per attention context width."""

    name: str
    modules: Mapping[int, tuple[HypernetworkMLP, HypernetworkMLP]]  # width -> (k_mlp, v_mlp)
    layer_structure: tuple[float, ...]
    ignored_widths: tuple[int, ...] = ()  # widths in the file that the base model has no attention for
    kind: Literal["hypernetwork"] = "hypernetwork"

    @property
    def nbytes(self) -> int:
        total = 0
        for pair in self.modules.values():
            for mlp in pair:
                tensors = list(mlp.weights) + list(mlp.biases) + [t for n in (mlp.norms or ()) for t in n]
                total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Hypernetwork:
        modules = {w: (k.to(device, dtype), v.to(device, dtype)) for w, (k, v) in self.modules.items()}
        return Hypernetwork(self.name, MappingProxyType(modules), self.layer_structure, self.ignored_widths)


def apply_hypernetwork(context: torch.Tensor, mlp: HypernetworkMLP, strength: float | torch.Tensor) -> torch.Tensor:
    """`context + mlp(context) · strength`, A1111's `HypernetworkModule.forward` with its multiplier.

    context [..., width]; strength a float or a tensor broadcastable to context (e.g. [rows, 1, 1]
    for per-row strengths). Returns a new tensor; nothing is modified in place.
    """
    return context + mlp(context) * strength


def looks_like_pickle(source: Source) -> bool:
    """torch.save writes a zip (`PK\\x03\\x04`), older files a bare pickle (protocol byte 0x80)."""
    if isinstance(source, bytes | bytearray | memoryview):
        head = bytes(source[:4])
    else:
        try:
            with open(source, "rb") as handle:
                head = handle.read(4)
        except OSError:
            return False  # reported by the reader
    return head.startswith((b"PK\x03\x04", b"\x80"))


def key_of(width: int, side: str, layer: int, param: str) -> str:
    """The file key of one parameter; `param` is "weight", "bias", "norm.weight" or "norm.bias"."""
    return f"{PREFIX}{width}.{side}.{layer}.{param}"


def metadata_of(layer_structure: list[float], activation: str, activate_output: bool, layer_norm: bool) -> str:
    return json.dumps({"format": FORMAT_VERSION, "layer_structure": layer_structure, "activation": activation,
                       "activate_output": activate_output, "layer_norm": layer_norm})


def _config(name: str, metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise AdapterError(name, f"not a hypernetwork file (no {METADATA_KEY!r} metadata)")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        config = None
    if not isinstance(config, dict) or config.get("format") != FORMAT_VERSION:
        raise AdapterError(name, "hypernetwork metadata is not valid")
    structure = config.get("layer_structure")
    if (not isinstance(structure, list) or not 2 <= len(structure) <= MAX_LAYERS + 1
            or not all(isinstance(s, int | float) and not isinstance(s, bool) and 0 < s <= MAX_EXPANSION
                       for s in structure) or structure[0] != 1 or structure[-1] != 1):
        raise AdapterError(name, f"layer_structure must be 2 to {MAX_LAYERS + 1} positive sizes, "
                                 "starting and ending with 1")
    activation = config.get("activation")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise AdapterError(name, f"activation {short(str(activation), 40)!r} is not supported")
    for flag in ("activate_output", "layer_norm"):
        if not isinstance(config.get(flag), bool):
            raise AdapterError(name, f"hypernetwork metadata {flag!r} must be true or false")
    return config


def load_hypernetwork(
    source: Source,
    name: str,
    widths: Collection[int] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Hypernetwork:
    """Read and check a hypernetwork file (sdserve's safetensors layout, path or bytes).

    `widths` are the base model's attention context widths (e.g. {320, 640, 768, 1280} for SD 1.x);
    modules for other widths are dropped, as A1111 does, and recorded in `ignored_widths`; a file
    with none of them is refused. `name` is how errors refer to the file.
    """
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise AdapterError(name, PICKLE_PROBLEM)
    try:
        raw = read_safetensors(source, name)
    except AdapterError:
        # Sniffed only after the safetensors check fails: a header length can start with 0x80 too.
        if looks_like_pickle(source):
            raise AdapterError(name, PICKLE_PROBLEM) from None
        raise
    config = _config(name, raw.metadata)
    structure = [float(s) for s in config["layer_structure"]]
    num_layers = len(structure) - 1

    grouped: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in raw.tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(name, f"unexpected key {short(key)!r} in a hypernetwork file")
        width, side, layer, param = int(match[1]), match[2], int(match[3]), match[4]
        grouped.setdefault(width, {}).setdefault(side, {})[f"{layer}.{param}"] = tensor
    if not grouped:
        raise AdapterError(name, "hypernetwork file holds no modules")

    usable = sorted(grouped) if widths is None else sorted(w for w in grouped if w in set(widths))
    if not usable:
        raise AdapterError(name, f"no module matches the model's attention widths {sorted(widths or ())} "
                                 f"(the file has {sorted(grouped)})")
    modules: dict[int, tuple[HypernetworkMLP, HypernetworkMLP]] = {}
    for width in usable:
        sides = grouped[width]
        if set(sides) != {"k", "v"}:
            raise AdapterError(name, f"width {width} needs both k and v modules")
        pair = tuple(_mlp(name, width, side, sides[side], structure, num_layers, config, dtype) for side in "kv")
        modules[width] = (pair[0], pair[1])
    return Hypernetwork(name=name, modules=MappingProxyType(modules), layer_structure=tuple(structure),
                        ignored_widths=tuple(w for w in sorted(grouped) if w not in modules))


def _mlp(name: str, width: int, side: str, params: dict[str, torch.Tensor], structure: list[float],
         num_layers: int, config: Mapping[str, Any], dtype: torch.dtype) -> HypernetworkMLP:
    sizes = [int(width * s) for s in structure]  # A1111: int(dim * layer_structure[i])
    if min(sizes) < 1:
        # A tiny positive entry (1e-300) passes the metadata check but leaves a layer with no
        # units: an MLP of empty matrices that silently outputs its last bias.
        raise AdapterError(name, f"layer_structure {structure} gives width {width} a layer of 0 units")
    expected = {f"{i}.{p}" for i in range(num_layers) for p in ("weight", "bias")}
    if config["layer_norm"]:
        expected |= {f"{i}.norm.{p}" for i in range(num_layers) for p in ("weight", "bias")}
    if set(params) != expected:
        missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise AdapterError(name, f"width {width} {side}: {detail} for layer_structure {structure}")
    weights, biases, norms = [], [], []
    for i in range(num_layers):
        shapes = {"weight": (sizes[i + 1], sizes[i]), "bias": (sizes[i + 1],),
                  "norm.weight": (sizes[i + 1],), "norm.bias": (sizes[i + 1],)}
        layer = {}
        for param, shape in shapes.items():
            if f"{i}.{param}" not in params:
                continue
            tensor = params[f"{i}.{param}"]
            where = f"{key_of(width, side, i, param)!r}"
            if tensor.dtype not in _FLOAT_DTYPES:
                raise AdapterError(name, f"{where} is not a floating-point tensor")
            if tuple(tensor.shape) != shape:
                raise AdapterError(name, f"{where} has shape {list(tensor.shape)}, expected {list(shape)}")
            converted = tensor.to(dtype).contiguous()
            if not bool(torch.isfinite(converted).all()):
                raise AdapterError(name, f"{where} contains NaN or infinite values")
            layer[param] = converted
        weights.append(layer["weight"])
        biases.append(layer["bias"])
        if config["layer_norm"]:
            norms.append((layer["norm.weight"], layer["norm.bias"]))
    return HypernetworkMLP(tuple(weights), tuple(biases), tuple(norms) if config["layer_norm"] else None,
                           config["activation"], config["activate_output"])

"""LoRA in memory: one contiguous buffer per adapter, A and B of every module as views into it.

One buffer makes an adapter's move between host and device tiers a single copy, and its
byte size exactly the bytes of its factors. Orientation is PEFT's: A `[r, in]` (a conv's A
flattened to `[r, in·kh·kw]`), B `[out, r]`, and the module's output gains

    y += scale · B @ (A @ x)        scale = alpha / r   (alpha / √r for rsLoRA)

LyCORIS LoHa and LoKr modules become their exact LoRA form at load (`adapters.lycoris`), so
the multi-LoRA kernels serve them per row beside plain LoRAs; `LoRAAdapter.lycoris` says how.

Loading is two steps: `parse_lora_file` reads a file of any supported layout into raw pairs,
`validate_lora` checks every pair against the base model and only then packs the buffer, so a
file that fails any check leaves nothing behind. Where the file's data section (read once into
memory) already holds the factors in the serving dtype and in the buffer's order, as diffusers
writes them, that memory is the buffer and nothing is copied again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

import torch

from sdserve.adapters import detect
from sdserve.adapters.formats.common import RawLycoris, RawPair, short
from sdserve.adapters.formats.kohya import parse_kohya
from sdserve.adapters.formats.peft import parse_peft
from sdserve.adapters.lycoris import LycorisInfo, lycoris_pair
from sdserve.adapters.reader import Allocator, Source, fresh_bytes, read_safetensors
from sdserve.adapters.targets import TargetSpec
from sdserve.errors import AdapterError

DEFAULT_MAX_RANK = 128
# Largest |scale| (alpha / rank, alpha / sqrt(rank) for rsLoRA) a file may give a module. Trainers
# set alpha between about 1 and a few times the rank, so real scales are at most a few (rsLoRA:
# a few times sqrt(128) ~ 11 at the largest rank served); 1000 leaves two orders of magnitude
# above that, while a file's alpha of 1e300 (finite, accepted before) made every output NaN and
# the request came back OK with a black image. A request's own strength is applied on top.
MAX_SCALE = 1000.0
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LoRAModule:
    """One adapted module. `a` and `b` are views into the owning adapter's buffer."""

    target: str  # "<component>.<module path>"
    kind: Literal["linear", "conv"]
    rank: int
    alpha: float
    scale: float  # alpha / rank, or alpha / sqrt(rank) for rsLoRA
    a: torch.Tensor = field(repr=False)  # [rank, in] or [rank, in*kh*kw]
    b: torch.Tensor = field(repr=False)  # [out, rank]
    a_offset: int  # element offsets into the buffer, to rebuild the views after a move
    b_offset: int
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    # DoRA's magnitude vector m, float32 [out], held apart from the buffer; None for a plain LoRA.
    # A DoRA module's output is m ⊙ (W x + s·B A x) / ‖W + s·B A‖ (norm per output channel) plus
    # the bias, s its scale times the request's strength: `kernels.lora_dora` applies it per row.
    magnitude: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def of(cls, **fields: object) -> LoRAModule:
        """The frozen dataclass built without its generated __init__, whose one
        object.__setattr__ per field made 192 modules cost 0.41 ms of a 12 ms load (0.06 ms so).
        Callers pass every field by name; a missing or unknown one is refused as __init__ would."""
        if fields.keys() != _MODULE_FIELDS:
            raise TypeError(f"LoRAModule fields differ: {sorted(fields.keys() ^ _MODULE_FIELDS)}")
        module = object.__new__(cls)
        module.__dict__.update(fields)
        return module

    def delta_weight(self) -> torch.Tensor:
        """scale · B @ A in the base weight's shape: [out, in] or [out, in, kh, kw] (the LoRA part
        only: a DoRA module's rescaling by its magnitude is not in it)."""
        delta = self.scale * (self.b.float() @ self.a.float())  # [out, in*kh*kw]
        if self.kind == "conv":
            return delta.reshape(self.out_features, self.in_features, *self.kernel_size)
        return delta


_MODULE_FIELDS = frozenset(LoRAModule.__dataclass_fields__)


@dataclass(frozen=True)
class LoRAAdapter:
    """A validated LoRA (or Concept Slider) ready for residency and the multi-LoRA kernels."""

    name: str
    is_slider: bool
    layout: detect.Layout  # the file layout it was read from
    modules: Mapping[str, LoRAModule]  # target -> module, sorted by target
    buffer: torch.Tensor = field(repr=False)  # [total elements] flat, contiguous
    kind: Literal["lora"] = "lora"
    # target -> how a LyCORIS (LoHa/LoKr) module of the file is served; empty for plain LoRAs
    lycoris: Mapping[str, LycorisInfo] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def dora_targets(self) -> tuple[str, ...]:
        """Targets whose module is DoRA (has a magnitude vector)."""
        return tuple(target for target, module in self.modules.items() if module.magnitude is not None)

    @property
    def max_rank(self) -> int:
        return max(module.rank for module in self.modules.values())

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(sorted({target.partition(".")[0] for target in self.modules}))

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> LoRAAdapter:
        """The same adapter with its buffer moved (one copy) and every view rebuilt on it."""
        buffer = self.buffer.to(device=device, dtype=dtype, non_blocking=non_blocking)
        if buffer is self.buffer:
            return self
        return replace(self, buffer=buffer, modules=_rebind(self.modules, buffer))


def _rebind(modules: Mapping[str, LoRAModule], buffer: torch.Tensor) -> Mapping[str, LoRAModule]:
    rebound = {}
    for target, module in modules.items():
        out, rank = module.b.shape
        columns = module.a.shape[1]
        a = buffer[module.a_offset : module.a_offset + rank * columns].view(rank, columns)
        b = buffer[module.b_offset : module.b_offset + out * rank].view(out, rank)
        rebound[target] = replace(module, a=a, b=b)
    return MappingProxyType(rebound)


@dataclass(frozen=True)
class ParsedLoRA:
    """A LoRA file read and paired, not yet checked against a base model."""

    layout: detect.Layout
    pairs: list[RawPair]
    is_slider: bool
    data: torch.Tensor | None = None  # [bytes] uint8: the file's data section, which pairs view
    lycoris: tuple[RawLycoris, ...] = ()  # LoHa/LoKr modules, converted by validate_lora


def parse_lora_file(
    source: Source, name: str, targets: Mapping[str, TargetSpec], alloc: Allocator | None = None
) -> ParsedLoRA:
    """Read a safetensors LoRA of any supported layout; refuse other adapter kinds.

    `targets` is needed already here because kohya names resolve only against real modules.
    `alloc` provides the memory the file's data section is read into.
    """
    raw = read_safetensors(source, name, shared=True, alloc=alloc)
    detect.check_kind(name, raw.tensors.keys(), raw.metadata)
    layout = detect.detect_layout(name, raw.tensors.keys())
    lycoris: list[RawLycoris] = []
    if layout == "kohya":
        pairs, lycoris = parse_kohya(name, raw.tensors, targets.keys())
    else:
        pairs = parse_peft(name, raw.tensors, raw.metadata, targets)
    return ParsedLoRA(layout=layout, pairs=pairs, is_slider=detect.is_slider(raw.metadata), data=raw.data,
                      lycoris=tuple(lycoris))


def _module(pair: RawPair) -> str:
    return f"module {short(pair.target)!r}"


def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _check_pair(name: str, pair: RawPair, spec: TargetSpec, max_rank: int) -> int:
    """Check one pair's dtypes, shapes and rank against its module; return the rank.

    Messages are formatted only when raised: 192 pairs pass per load of a typical LoRA.
    """
    down, up = pair.down, pair.up
    if down.dtype not in _FLOAT_DTYPES or up.dtype not in _FLOAT_DTYPES:
        dtype = down.dtype if down.dtype not in _FLOAT_DTYPES else up.dtype
        raise AdapterError(name, f"{_module(pair)}: weights have dtype "
                                 f"{str(dtype).removeprefix('torch.')}, expected a floating-point type")
    rank = down.shape[0] if down.ndim >= 1 else 0
    if rank < 1 or up.ndim < 2 or up.shape[1] < 1:
        raise AdapterError(name, f"{_module(pair)}: rank is 0")
    if rank > max_rank and pair.source == "lora":  # a LyCORIS module's file ranks were checked instead
        raise AdapterError(name, f"{_module(pair)}: rank {rank} exceeds the maximum of {max_rank}")
    kh, kw = spec.kernel_size
    if spec.kind == "linear":
        # LoRAs trained where proj_in/proj_out were 1x1 convs (SD 1.x) keep 1x1 factors when
        # used on models where they are linear (SD 2.x, SDXL): the same product.
        down_ok = down.shape in ((rank, spec.in_features), (rank, spec.in_features, 1, 1))
        up_ok = up.shape in ((spec.out_features, rank), (spec.out_features, rank, 1, 1))
        need_down, need_up = (rank, spec.in_features), (spec.out_features, rank)
    else:
        # A 1x1 conv's factors are sometimes stored as matrices; they mean the same product.
        down_ok = down.shape == (rank, spec.in_features, kh, kw) or (
            (kh, kw) == (1, 1) and down.shape == (rank, spec.in_features)
        )
        up_ok = up.shape in ((spec.out_features, rank, 1, 1), (spec.out_features, rank))
        need_down, need_up = (rank, spec.in_features, kh, kw), (spec.out_features, rank, 1, 1)
    if not down_ok:
        raise AdapterError(name, f"{_module(pair)}: down weight has shape {_dims(down.shape)}, "
                                 f"the base model needs {_dims(need_down)}")
    if not up_ok:
        raise AdapterError(name, f"{_module(pair)}: up weight has shape {_dims(up.shape)}, "
                                 f"the base model needs {_dims(need_up)}")
    if pair.config_rank is not None and pair.config_rank != rank:
        raise AdapterError(name, f"{_module(pair)}: the file's config declares rank {pair.config_rank}, "
                                 f"its weights have {rank}")
    return rank


def _alpha_and_scale(name: str, pair: RawPair, rank: int) -> tuple[float, float]:
    """The module's alpha (rank where the file gives none) and scale, refused beyond MAX_SCALE.

    The parsers refuse non-finite alphas with the key that held them; this also catches a pair
    built elsewhere, and a finite alpha (1e300) whose scale no trained adapter has.
    """
    alpha = float(rank) if pair.alpha is None else pair.alpha
    scale = alpha / math.sqrt(rank) if pair.use_rslora else alpha / rank
    if not abs(scale) <= MAX_SCALE:  # written so that NaN fails too
        rule = "alpha / sqrt(rank)" if pair.use_rslora else "alpha / rank"
        raise AdapterError(name, f"module {short(pair.target)!r}: scale {rule} = {alpha:g} / {rank} "
                                 f"is beyond the limit of {MAX_SCALE:g} in magnitude")
    return alpha, scale


def _magnitude(name: str, pair: RawPair, spec: TargetSpec) -> torch.Tensor:
    """A DoRA module's magnitude vector checked against its module, as float32 [out].

    PEFT writes [out] for a Linear and [1, out, 1, 1] for a conv; LyCORIS ("dora_scale", its
    default wd_on_out=True) [out, 1] and [out, 1, 1, 1]. LyCORIS' wd_on_out=False decomposes per
    input column instead ([1, in]): another formula, refused by shape.
    """
    magnitude, key = pair.magnitude, short(pair.magnitude_key or pair.key)
    assert magnitude is not None
    out = spec.out_features
    kohya = (pair.magnitude_key or "").endswith(".dora_scale")
    if spec.kind == "linear":
        shapes = ((out, 1), (out,)) if kohya else ((out,),)
    else:
        shapes = ((out, 1, 1, 1), (out,)) if kohya else ((1, out, 1, 1), (out,))
    if magnitude.dtype not in _FLOAT_DTYPES:
        raise AdapterError(name, f"{_module(pair)}: DoRA magnitude {key!r} has dtype "
                                 f"{str(magnitude.dtype).removeprefix('torch.')}, expected a floating-point type")
    if tuple(magnitude.shape) not in shapes:
        raise AdapterError(name, f"{_module(pair)}: DoRA magnitude {key!r} has shape {_dims(magnitude.shape)}, "
                                 f"the base model needs {_dims(shapes[0])}")
    values = magnitude.reshape(out).to(torch.float32).clone()  # [out]
    if not torch.isfinite(values).all():
        raise AdapterError(name, f"{_module(pair)}: DoRA magnitude {key!r} contains NaN or infinite values")
    return values


def validate_lora(
    parsed: ParsedLoRA,
    name: str,
    targets: Mapping[str, TargetSpec],
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    dtype: torch.dtype = torch.float32,
    is_slider: bool | None = None,
    alloc: Allocator | None = None,
) -> LoRAAdapter:
    """Check every pair against the base model, then pack all factors into one buffer
    (memory from `alloc` where the file's own cannot serve as the buffer)."""
    if not parsed.pairs and not parsed.lycoris:
        raise AdapterError(name, "not a LoRA file (no LoRA weight keys found)")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    pairs = list(parsed.pairs)
    lycoris: dict[str, LycorisInfo] = {}
    for raw in parsed.lycoris:
        spec = targets.get(raw.target)
        if spec is None:
            raise AdapterError(name, f"LoRA key {short(raw.key)!r} does not match any module of the base model")
        pair, lycoris[raw.target] = lycoris_pair(name, raw, spec, max_rank)
        pairs.append(pair)
    checked: list[tuple[RawPair, TargetSpec, int]] = []
    alphas_and_scales: dict[str, tuple[float, float]] = {}
    for pair in sorted(pairs, key=lambda p: p.target):
        spec = targets.get(pair.target)
        if spec is None:
            raise AdapterError(name, f"LoRA key {short(pair.key)!r} does not match any module of the base model")
        rank = _check_pair(name, pair, spec, max_rank)
        checked.append((pair, spec, rank))
        alphas_and_scales[pair.target] = _alpha_and_scale(name, pair, rank)
    magnitudes = {pair.target: _magnitude(name, pair, spec) for pair, spec, _ in checked if pair.magnitude is not None}

    # Where the file already holds the packed buffer, it is used as read: no second copy, and
    # its factors, already views of that buffer at their offsets, serve as the modules' A and B.
    buffer = _buffer_in_file(parsed.data, checked, dtype)
    in_file = buffer is not None
    if buffer is None:
        buffer = _pack(checked, dtype, alloc)
    offsets = _offsets(checked)
    modules: dict[str, LoRAModule] = {}
    for (pair, spec, rank), (a_offset, b_offset) in zip(checked, offsets, strict=True):
        a_shape, b_shape = (rank, spec.a_columns), (spec.out_features, rank)
        if in_file:
            a = pair.down if pair.down.shape == a_shape else pair.down.view(a_shape)
            b = pair.up if pair.up.shape == b_shape else pair.up.view(b_shape)
        else:
            a = buffer[a_offset : a_offset + rank * spec.a_columns].view(a_shape)
            b = buffer[b_offset : b_offset + spec.out_features * rank].view(b_shape)
        alpha, scale = alphas_and_scales[pair.target]
        modules[pair.target] = LoRAModule.of(
            target=pair.target, kind=spec.kind, rank=rank, alpha=alpha, scale=scale, a=a, b=b,
            a_offset=a_offset, b_offset=b_offset,
            in_features=spec.in_features, out_features=spec.out_features, kernel_size=spec.kernel_size,
            stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
            magnitude=magnitudes.get(pair.target),
        )
    _check_finite(name, buffer, modules, dtype)
    return LoRAAdapter(
        name=name,
        is_slider=parsed.is_slider if is_slider is None else is_slider,
        layout=parsed.layout,
        modules=MappingProxyType(modules),
        buffer=buffer,
        lycoris=MappingProxyType(dict(sorted(lycoris.items()))),
    )


def _check_finite(name: str, buffer: torch.Tensor, modules: Mapping[str, LoRAModule], dtype: torch.dtype) -> None:
    """Refuse NaN or ±inf anywhere in the packed buffer, naming the first module that holds one.

    Checked after the cast, so values that overflow the serving dtype are caught too. A sum is
    one pass with no full-size temporaries, faster than aminmax (0.56 against 0.87 ms on 27 MB):
    NaN or ±inf anywhere makes it non-finite. A non-finite sum of finite values (an overflow) is
    told apart by the exact aminmax check, so no finite adapter is refused.
    """
    if not buffer.numel() or math.isfinite(float(buffer.sum())):
        return
    low, high = torch.aminmax(buffer)
    if math.isfinite(float(low)) and math.isfinite(float(high)):
        return
    bad = next(t for t, m in modules.items() if not (torch.isfinite(m.a).all() and torch.isfinite(m.b).all()))
    raise AdapterError(name, f"module {short(bad)!r}: weights contain NaN or infinite values"
                             + ("" if dtype == torch.float32 else f" in {str(dtype).removeprefix('torch.')}"))


# Bytes of a file's data section that may stay allocated beside a buffer kept from it, uncounted
# by nbytes (scalars of another dtype, sorted apart by the writer): a page, plus 1 % of the buffer.
_EXTRA_BYTES_PAGE = 4096
_EXTRA_BYTES_FRACTION = 100


def _offsets(checked: list[tuple[RawPair, TargetSpec, int]]) -> list[tuple[int, int]]:
    """Element offsets of each module's (A, B) in the packed buffer: by target, A then B."""
    offsets, offset = [], 0
    for _, spec, rank in checked:
        a_size = rank * spec.a_columns
        offsets.append((offset, offset + a_size))
        offset += a_size + spec.out_features * rank
    return offsets


def _pack(
    checked: list[tuple[RawPair, TargetSpec, int]], dtype: torch.dtype, alloc: Allocator | None = None
) -> torch.Tensor:
    """Every factor copied (and cast) into a new buffer at its `_offsets`."""
    total = sum(rank * (spec.a_columns + spec.out_features) for _, spec, rank in checked)
    buffer = (alloc or fresh_bytes)(total * dtype.itemsize).view(dtype)  # [sum over modules of r·(in·kh·kw + out)]
    for (pair, spec, rank), (a_offset, b_offset) in zip(checked, _offsets(checked), strict=True):
        buffer[a_offset : a_offset + rank * spec.a_columns].view(rank, spec.a_columns).copy_(
            pair.down.reshape(rank, spec.a_columns))
        buffer[b_offset : b_offset + spec.out_features * rank].view(spec.out_features, rank).copy_(
            pair.up.reshape(spec.out_features, rank))
    return buffer


def _buffer_in_file(
    data: torch.Tensor | None, checked: list[tuple[RawPair, TargetSpec, int]], dtype: torch.dtype,
) -> torch.Tensor | None:
    """The part of the file's data section that already is the packed buffer `_pack` would build.

    That is: every factor a `dtype` view of `data`, and together back to back in `_pack`'s order
    (modules by target, each A then B), aligned to the dtype. diffusers/PEFT files written by the
    safetensors library in the serving dtype are laid out so (keys sorted, "lora_A" < "lora_B");
    kohya files interleave their ".alpha" scalars and are copied. A conv's A `[r, in, kh, kw]`,
    contiguous, is its `[r, in·kh·kw]` as is. None where anything differs: the caller copies.
    """
    if data is None or data.dtype != torch.uint8 or data.ndim != 1 or not data.is_contiguous():
        return None
    storage = data.untyped_storage().data_ptr()
    base, size = data.data_ptr(), data.numel()
    low = checked[0][0].down.data_ptr() - base
    position = low
    for pair, _, _ in checked:
        for factor in (pair.down, pair.up):
            if factor.dtype != dtype or factor.device != data.device or not factor.is_contiguous():
                return None
            if factor.untyped_storage().data_ptr() != storage or factor.data_ptr() - base != position:
                return None
            position += factor.numel() * dtype.itemsize
    if low < 0 or position > size or (base + low) % dtype.itemsize:
        return None
    # Bytes outside [low, position) (alphas of another dtype, sorted apart) stay allocated with
    # the buffer without being counted in nbytes; a few, or the file is copied instead.
    if size - (position - low) > _EXTRA_BYTES_PAGE + (position - low) // _EXTRA_BYTES_FRACTION:
        return None
    return data[low:position].view(dtype)  # [sum over modules of r·(in·kh·kw + out)]


def load_lora(
    source: Source,
    name: str,
    targets: Mapping[str, TargetSpec],
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    dtype: torch.dtype = torch.float32,
    is_slider: bool | None = None,
    alloc: Allocator | None = None,
) -> LoRAAdapter:
    """Read, validate and pack a LoRA safetensors file (path or bytes) against a base model.

    `name` is how errors and the adapter refer to the file. `is_slider` overrides what the
    file's metadata says. `alloc` provides the memory read and packed into (the adapter
    runtime's `HostArena.take`; default: fresh tensors). Raises AdapterError /
    UnsupportedAdapterKind, nothing else, for any problem with the file.
    """
    parsed = parse_lora_file(source, name, targets, alloc)
    return validate_lora(parsed, name, targets, max_rank=max_rank, dtype=dtype, is_slider=is_slider, alloc=alloc)

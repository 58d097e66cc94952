"""LyCORIS LoHa and LoKr modules: checked against the base model, then served as an exact LoRA.

Every delta is written as the served LoRA sees it: a conv's `[out, in, kh, kw]` flattened to
`[out, f]`, f = in·kh·kw (the multi-LoRA kernels run a conv's A with the base conv's geometry).

    LoHa   ΔW = s · (W1a W1b) ⊙ (W2a W2b)        W1a [out, r1], W1b [r1, f], W2a [out, r2], W2b [r2, f]
              = s · B A,  B[o, (i,j)] = W1a[o,i] W2a[o,j],  A[(i,j), c] = W1b[i,c] W2b[j,c]

the row-wise Kronecker (face-splitting) product: an exact LoRA of rank r1·r2. A Tucker conv half
(`hada_t1` [r, r, kh, kw], `hada_w1_a` [r, out], `hada_w1_b` [r, in]) is W1a = w1_a^T and
W1b[i, (c,k,l)] = Σ_j t1[i,j,k,l] w1_b[j,c]: rank r again.

    LoKr   ΔW = s · kron(W1, W2)                  W1 [a, c], W2 [b, d·kh·kw], out = a·b, in = c·d

(LyCORIS krons W1 [a, c, 1, 1] with the 4-D W2; flattened that is this matrix kron.) With
W1 = P Q and W2 = R S, kron(P Q, R S) = kron(P, R) · kron(Q, S): an exact LoRA of rank
rank(P)·rank(R). A half given whole, [m, n], is itself times an identity: rank min(m, n).

Which form a module is served in: a LoRA of rank R costs R·(out + f) floats and 2·R·(out + f)
FLOPs per token, so the structured factorization is kept when its rank is below min(out, f);
otherwise the delta is materialized dense, D [out, f], and served as I_out @ D (rank out) or
D @ I_f (rank f), whichever is smaller: the kernels take factors only, so "dense" costs
min(out, f)·(out + f), at most twice out·f. Either way the product is exact (one rounding
per factor entry); `LycorisInfo.form` says which. Scales follow LyCORIS's forward pass:
s = alpha / r1 for LoHa (alpha absent or 0: s = 1), alpha / r for LoKr with r the rank of its
factored half, and s = 1 for a LoKr whose two halves are both whole.

The file's own ranks (r1, r2, a LoKr's r) are bounded by the caller's `max_rank`, like a LoRA's;
the served rank is bounded by the module's shape. Plain torch, no import of `sdserve.kernels`
(adapters import errors only): the oracle this is checked against is `kernels/lycoris_reference.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdserve.adapters.formats.common import RawLycoris, RawPair, short
from sdserve.adapters.targets import TargetSpec
from sdserve.errors import AdapterError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LycorisInfo:
    """How one LyCORIS module of a file is served."""

    kind: str  # "loha" | "lokr"
    file_rank: int  # LoHa: r1 (its alpha's divisor); LoKr: the factored half's rank, 0 when both are whole
    served_rank: int  # the rank of the LoRA form served
    form: str  # "factorized" | "dense"
    scale: float  # LyCORIS's alpha / rank rule (see the module docstring)
    tucker: bool


class _Module:
    """One RawLycoris with its error helpers: every message names the file key concerned."""

    def __init__(self, name: str, raw: RawLycoris, spec: TargetSpec, max_rank: int) -> None:
        self.name, self.raw, self.spec, self.max_rank = name, raw, spec, max_rank

    def fail(self, key: str, problem: str) -> AdapterError:
        return AdapterError(self.name, f"key {short(key)!r}: {problem}")

    def get(self, role: str) -> torch.Tensor | None:
        """The role's tensor as float32, checked for dtype and finite values; None if absent."""
        found = self.raw.tensors.get(role)
        if found is None:
            return None
        key, tensor = found
        if tensor.dtype not in _FLOAT_DTYPES:
            raise self.fail(key, f"dtype {str(tensor.dtype).removeprefix('torch.')}, expected a floating-point type")
        if tensor.numel() == 0:
            raise self.fail(key, "is empty")
        values = tensor.float()
        if not bool(torch.isfinite(values).all()):
            raise self.fail(key, "contains NaN or infinite values")
        return values

    def need(self, role: str, partner: str) -> torch.Tensor:
        """A role the module's other keys require; its absence is a missing half."""
        value = self.get(role)
        if value is None:
            raise self.fail(self.raw.tensors[partner][0], f"has no matching {role!r} in the file")
        return value

    def key(self, role: str) -> str:
        return self.raw.tensors[role][0]

    def shape(self, role: str, value: torch.Tensor, *expected: tuple[int, ...]) -> None:
        if tuple(value.shape) not in expected:
            need = " or ".join("[" + ", ".join(map(str, e)) + "]" for e in expected)
            have = "[" + ", ".join(map(str, value.shape)) + "]"
            raise self.fail(self.key(role), f"shape {have}, the base model's module needs {need}")

    def rank(self, role: str, value: torch.Tensor, rank: int) -> int:
        if rank < 1:
            raise self.fail(self.key(role), "rank is 0")
        if rank > self.max_rank:
            raise self.fail(self.key(role), f"rank {rank} exceeds the maximum of {self.max_rank}")
        return rank


def lycoris_pair(name: str, raw: RawLycoris, spec: TargetSpec, max_rank: int) -> tuple[RawPair, LycorisInfo]:
    """Check a LoHa/LoKr module against its base module; return its exact LoRA form as a pair
    (down [R, in] or [R, in, kh, kw], up [out, R], float32; alpha = s·R, so alpha / R is the
    module's scale)."""
    module = _Module(name, raw, spec, max_rank)
    unknown = sorted(set(raw.tensors) - set(_ROLES[raw.kind]))
    if unknown:
        raise module.fail(module.key(unknown[0]), f"a {_NAMES[raw.kind]} module has no {unknown[0]!r} weight")
    if raw.kind == "loha":
        halves, tucker, file_rank = _loha_halves(module)
        scale = (raw.alpha if raw.alpha is not None else file_rank) / file_rank
        up, down, form = _serve_loha(halves, spec)
    else:
        (w1, w2), tucker, file_rank = _lokr_halves(module)
        scale = 1.0 if file_rank == 0 or raw.alpha is None else raw.alpha / file_rank
        up, down, form = _serve_lokr(w1, w2, spec)
    if not abs(scale) <= _max_scale():
        raise module.fail(raw.key, f"scale alpha / rank = {raw.alpha or 0:g} / {file_rank} is beyond the limit of "
                                   f"{_max_scale():g} in magnitude")
    served = down.shape[0]
    if spec.kind == "conv":  # a LoCon's down conv, as `validate_lora` checks it
        down = down.reshape(served, spec.in_features, *spec.kernel_size)
    info = LycorisInfo(kind=raw.kind, file_rank=file_rank, served_rank=served, form=form, scale=scale, tucker=tucker)
    pair = RawPair(target=raw.target, down=down, up=up, alpha=scale * served, use_rslora=False, key=raw.key,
                   source=raw.kind)
    return pair, info


_ROLES = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
_NAMES = {"loha": "LoHa", "lokr": "LoKr"}


def _max_scale() -> float:
    from sdserve.adapters.lora import MAX_SCALE  # lora imports this module: read at call time

    return MAX_SCALE


# A factorized half: up [rows, r], down [r, cols], its product the half's matrix.
Half = tuple[torch.Tensor, torch.Tensor]


def _tucker_down(t: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """[r, in·kh·kw]: M[i, (c,k,l)] = Σ_j t[i,j,k,l] down[j,c], so that up^T @ M is the rebuilt kernel."""
    return torch.einsum("ijkl,jc->ickl", t, down).reshape(t.shape[0], -1)


def _loha_halves(module: _Module) -> tuple[tuple[Half, Half], bool, int]:
    spec = module.spec
    out, f = spec.out_features, spec.a_columns
    kh, kw = spec.kernel_size
    tucker = "hada_t1" in module.raw.tensors or "hada_t2" in module.raw.tensors
    halves = []
    for index in (1, 2):
        up_role, down_role = f"hada_w{index}_a", f"hada_w{index}_b"
        any_role = next(role for role in module.raw.tensors if role.startswith("hada_"))
        up, down = module.need(up_role, any_role), module.need(down_role, any_role)
        if tucker:
            t_role = f"hada_t{index}"
            t = module.need(t_role, any_role)
            if spec.kind != "conv":
                raise module.fail(module.key(t_role), "a Tucker factor on a linear module")
            rank = module.rank(t_role, t, t.shape[0] if t.ndim == 4 else 0)
            module.shape(t_role, t, (rank, rank, kh, kw))
            module.shape(up_role, up, (rank, out))
            module.shape(down_role, down, (rank, spec.in_features))
            halves.append((up.t(), _tucker_down(t, down)))
            continue
        rank = module.rank(up_role, up, up.shape[1] if up.ndim == 2 else 0)
        module.shape(up_role, up, (out, rank))
        module.shape(down_role, down, (rank, f), (rank, spec.in_features, kh, kw))
        halves.append((up, down.reshape(rank, f)))
    file_rank = halves[0][1].shape[0]
    return (halves[0], halves[1]), tucker, file_rank


def _serve_loha(halves: tuple[Half, Half], spec: TargetSpec) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(up [out, R], down [R, f], form) with up @ down = (W1a W1b) ⊙ (W2a W2b)."""
    (up1, down1), (up2, down2) = halves
    out, f = spec.out_features, spec.a_columns
    structured = down1.shape[0] * down2.shape[0]
    if structured < min(out, f):
        up = (up1[:, :, None] * up2[:, None, :]).reshape(out, structured)  # [out, r1·r2]
        down = (down1[:, None, :] * down2[None, :, :]).reshape(structured, f)  # [r1·r2, f]
        return up, down, "factorized"
    return *_dense((up1 @ down1) * (up2 @ down2)), "dense"


def _dense(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of the exact LoRA of least rank built from a dense delta [out, f] and an identity."""
    out, f = delta.shape
    if out <= f:
        return torch.eye(out), delta.contiguous()
    return delta.contiguous(), torch.eye(f)


def _lokr_half(module: _Module, index: int) -> tuple[torch.Tensor | None, Half | None]:
    """One LoKr half as it is stored: (the whole matrix, None) or (None, (up, down))."""
    whole, up_role, down_role = f"lokr_w{index}", f"lokr_w{index}_a", f"lokr_w{index}_b"
    tensors = module.raw.tensors
    if whole in tensors:
        extra = next((role for role in (up_role, down_role) if role in tensors), None)
        if extra is not None:
            raise module.fail(module.key(extra), f"the file also holds {whole!r}: a LoKr half is whole or factored")
        return module.need(whole, whole), None
    present = next((role for role in (up_role, down_role) if role in tensors), None)
    if present is None:
        other = next(iter(tensors))
        raise module.fail(module.key(other), f"has no matching {whole!r} or {up_role!r}/{down_role!r} in the file")
    return None, (module.need(up_role, present), module.need(down_role, present))


def _lokr_halves(module: _Module) -> tuple[tuple[Half, Half], bool, int]:
    """Both halves as exact factorizations (a whole half times an identity), shapes checked."""
    spec = module.spec
    out, channels = spec.out_features, spec.in_features
    kh, kw = spec.kernel_size
    w1, factors1 = _lokr_half(module, 1)
    rank1 = 0
    if w1 is not None:
        if w1.ndim != 2:
            raise module.fail(module.key("lokr_w1"), "must be a matrix")
        a, c = w1.shape
        half1 = _whole(w1)
    else:
        assert factors1 is not None
        up1, down1 = factors1
        rank1 = module.rank("lokr_w1_a", up1, up1.shape[1] if up1.ndim == 2 else 0)
        if down1.ndim != 2 or down1.shape[0] != rank1:
            raise module.fail(module.key("lokr_w1_b"), f"shape {list(down1.shape)} does not follow "
                                                       f"'lokr_w1_a' {list(up1.shape)}")
        a, c = up1.shape[0], down1.shape[1]
        half1 = (up1, down1)
    if out % a or channels % c:
        key = module.key("lokr_w1" if w1 is not None else "lokr_w1_a")
        raise module.fail(key, f"a [{a}, {c}] first factor does not divide the base module's [{out}, {channels}]")
    b, d = out // a, channels // c
    f2 = d * kh * kw  # columns of W2 flattened as a conv's kernel is
    tucker = "lokr_t2" in module.raw.tensors
    w2, factors2 = _lokr_half(module, 2)
    rank2 = 0
    if w2 is not None:
        if tucker:
            raise module.fail(module.key("lokr_t2"), "a Tucker factor beside a whole 'lokr_w2'")
        module.shape("lokr_w2", w2, (b, f2), (b, d, kh, kw))
        half2 = _whole(w2.reshape(b, f2))
    elif tucker:
        assert factors2 is not None
        t = module.need("lokr_t2", "lokr_w2_a")
        if spec.kind != "conv":
            raise module.fail(module.key("lokr_t2"), "a Tucker factor on a linear module")
        rank2 = module.rank("lokr_t2", t, t.shape[0] if t.ndim == 4 else 0)
        module.shape("lokr_t2", t, (rank2, rank2, kh, kw))
        module.shape("lokr_w2_a", factors2[0], (rank2, b))
        module.shape("lokr_w2_b", factors2[1], (rank2, d))
        half2 = (factors2[0].t(), _tucker_down(t, factors2[1]))
    else:
        assert factors2 is not None
        up2, down2 = factors2
        rank2 = module.rank("lokr_w2_a", up2, up2.shape[1] if up2.ndim == 2 else 0)
        module.shape("lokr_w2_a", up2, (b, rank2))
        module.shape("lokr_w2_b", down2, (rank2, f2), (rank2, d, kh, kw))
        half2 = (up2, down2.reshape(rank2, f2))
    if rank1 and rank2 and rank1 != rank2:
        raise module.fail(module.key("lokr_w2_b"), f"rank {rank2} differs from 'lokr_w1_b' rank {rank1}: "
                                                   f"its alpha's divisor is ambiguous")
    return (half1, half2), tucker, rank1 or rank2


def _whole(matrix: torch.Tensor) -> Half:
    """A whole [m, n] factor as an exact product of least rank: I_m @ it, or it @ I_n."""
    m, n = matrix.shape
    return (torch.eye(m), matrix) if m <= n else (matrix, torch.eye(n))


def _serve_lokr(half1: Half, half2: Half, spec: TargetSpec) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(up [out, R], down [R, f], form) with up @ down = kron(W1, W2)."""
    (p, q), (r, s) = (tuple(factor.contiguous() for factor in half) for half in (half1, half2))  # kron views
    out, f = spec.out_features, spec.a_columns
    structured = p.shape[1] * r.shape[1]
    if structured < min(out, f):
        return torch.kron(p, r), torch.kron(q, s), "factorized"
    return *_dense(torch.kron(p @ q, r @ s)), "dense"


"""Plain torch oracles of LyCORIS LoHa and LoKr: their deltas by definition, and LoKr applied by reshape.

The engine serves a LoHa/LoKr module as the exact LoRA its factors form (`adapters/lycoris.py`:
face-splitting for LoHa, kron of factors for LoKr), through the multi-LoRA kernels. These are
the definitions that form is checked against, written from LyCORIS's published math (not its
code), in float64 and in the base weight's own shape:

    LoHa   ΔW = s · (W1a W1b) ⊙ (W2a W2b)                       (Hadamard product)
           Tucker conv half: W[p, q, k, l] = Σ_ij t[i,j,k,l] · wa[i,p] · wb[j,q]
    LoKr   ΔW = s · kron(W1, W2)        W1 [a, c], W2 [b, d(, kh, kw)]: ΔW [a·b, c·d(, kh, kw)]

`lokr_linear` applies a linear LoKr to activations without building ΔW: with x's features read
as X [c, d], kron(W1, W2) x = vec(W1 X W2^T), which costs a·c·d + a·b·d multiplies per token
(fewer still with W2 = W2a W2b) against out·in for ΔW x; a test oracle here, since the batched
kernels take LoRA factors.
"""

from __future__ import annotations

import torch


def tucker_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[p, q, k, l] = Σ_ij t[i,j,k,l] · wa[i,p] · wb[j,q]: t [r, r, kh, kw], wa [r, out], wb [r, in]."""
    return torch.einsum("ijkl,ip,jq->pqkl", t.double(), wa.double(), wb.double())


def loha_delta(
    w1a: torch.Tensor,  # [out, r1], or [r1, out] with t1
    w1b: torch.Tensor,  # [r1, in·kh·kw] or [r1, in, kh, kw], or [r1, in] with t1
    w2a: torch.Tensor,  # as w1a, rank r2
    w2b: torch.Tensor,  # as w1b, rank r2
    shape: tuple[int, ...],  # the base weight's: (out, in) or (out, in, kh, kw)
    scale: float = 1.0,
    t1: torch.Tensor | None = None,  # [r1, r1, kh, kw] (Tucker)
    t2: torch.Tensor | None = None,  # [r2, r2, kh, kw]
) -> torch.Tensor:
    """float64 ΔW [shape] = s · (W1a W1b) ⊙ (W2a W2b), each half Tucker-rebuilt when t is given."""
    if t1 is not None and t2 is not None:
        return scale * (tucker_rebuild(t1, w1a, w1b) * tucker_rebuild(t2, w2a, w2b)).reshape(shape)
    out = shape[0]
    half1 = w1a.double().reshape(out, -1) @ w1b.double().reshape(w1b.shape[0], -1)  # [out, in·kh·kw]
    half2 = w2a.double().reshape(out, -1) @ w2b.double().reshape(w2b.shape[0], -1)
    return scale * (half1 * half2).reshape(shape)


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """float64 ΔW = s · kron(W1, W2): W1 [a, c], W2 [b, d] or [b, d, kh, kw] -> [a·b, c·d(, kh, kw)]."""
    w1 = w1.double().reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))  # W1 [a, c, 1, 1] for a conv
    return scale * torch.kron(w1.contiguous(), w2.double().contiguous())  # kron views its inputs


def lokr_linear(
    x: torch.Tensor,  # [T, c·d]
    w1: torch.Tensor,  # [a, c]
    w2: torch.Tensor,  # [b, d]
    scale: float = 1.0,
) -> torch.Tensor:
    """float64 y [T, a·b] = s · kron(W1, W2) x, as s · vec(W1 X W2^T) with X = x viewed [c, d]."""
    a, c = w1.shape
    b, d = w2.shape
    features = x.double().reshape(-1, c, d)  # [T, c, d]
    y = torch.matmul(torch.matmul(w1.double(), features), w2.double().t())  # [T, a, b]
    return scale * y.reshape(-1, a * b)

"""Public scaled multi-branch attention: Triton on CUDA tensors when Triton imports, else the reference
(with the caller's attention function, e.g. xformers', when it gives one)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdserve.kernels.attention_reference import scaled_multi_branch_attention_reference
from sdserve.kernels.lora import use_triton


def scaled_multi_branch_attention(
    q: torch.Tensor,  # [B, H, Lq, D]
    k_text: torch.Tensor,  # [B, H, Lt, D]
    v_text: torch.Tensor,  # [B, H, Lt, D]
    k_image: torch.Tensor | None,  # [B, NB, H, Li, D]
    v_image: torch.Tensor | None,  # [B, NB, H, Li, D]
    image_scales: torch.Tensor | None,  # [B, NB] float32
    image_present: torch.Tensor | None,  # [B, NB] bool
    image_lengths: torch.Tensor | None = None,  # [B, NB] int32, valid image keys (default Li)
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:  # [B, H, Lq, D]
    """out[b] = softmax(q Kt^T/sqrt(D)) Vt + sum_{i: present[b,i]} scale[b,i] * softmax(q Ki^T/sqrt(D)) Vi.

    Branch 0 (text) has scale 1. An absent image branch (present False) is skipped; a present one
    at scale 0 is still computed, as diffusers' IP-Adapter processor does. With `attend` (softmax
    attention on [B, H, L, D], as F.scaled_dot_product_attention), every branch is computed by it:
    the engine's xformers backend passes xformers' kernel, which Triton's fused kernel would bypass.
    """
    args = (q, k_text, v_text, k_image, v_image, image_scales, image_present, image_lengths)
    if attend is not None:
        return scaled_multi_branch_attention_reference(*args, attend=attend)
    if use_triton(q):
        from sdserve.kernels.attention_triton import scaled_multi_branch_attention_triton

        return scaled_multi_branch_attention_triton(*args)
    return scaled_multi_branch_attention_reference(*args)

"""Torch reference of scaled multi-branch attention (IP-Adapter's decoupled cross-attention).

Branch 0 is the text branch at scale 1; branches 1.. are per-request image branches. A branch that
is absent for a row (`image_present` False) is skipped, not multiplied by zero: that request has
no such branch. A present branch at scale 0 still computes 0 * attention, as diffusers does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def scaled_multi_branch_attention_reference(
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

    Sums in float32, returns q's dtype. Each softmax(q K^T/sqrt(D)) V is `attend(q, k, v)` on
    [B, H, L, D] tensors: F.scaled_dot_product_attention by default, xformers' kernel for the
    xformers backend (kernels/attention_xformers.py).
    """
    attend = attend or F.scaled_dot_product_attention
    num_branches = check_attention_args(
        q, k_text, v_text, k_image, v_image, image_scales, image_present, image_lengths
    )
    out = attend(q, k_text, v_text).float()  # [B, H, Lq, D]
    if num_branches == 0:
        return out.to(q.dtype)
    present = image_present.tolist()
    scales = image_scales.tolist()
    full_length = k_image.shape[3]
    lengths = image_lengths.tolist() if image_lengths is not None else None
    for branch in range(num_branches):
        # Rows with this branch, grouped by their number of valid image keys.
        by_length: dict[int, list[int]] = {}
        for row in range(q.shape[0]):
            if present[row][branch]:
                length = lengths[row][branch] if lengths is not None else full_length
                if not 1 <= length <= full_length:
                    raise ValueError(f"image_lengths of present branches must lie in [1, {full_length}]")
                by_length.setdefault(length, []).append(row)
        for length, rows in by_length.items():
            index = torch.tensor(rows, device=q.device)
            attended = attend(
                q.index_select(0, index),
                k_image[index, branch, :, :length],
                v_image[index, branch, :, :length],
            )  # [len(rows), H, Lq, D]
            row_scales = torch.tensor([scales[row][branch] for row in rows], device=q.device)
            out.index_add_(0, index, attended.float() * row_scales.view(-1, 1, 1, 1))
    return out.to(q.dtype)


def check_attention_args(
    q: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    k_image: torch.Tensor | None,
    v_image: torch.Tensor | None,
    image_scales: torch.Tensor | None,
    image_present: torch.Tensor | None,
    image_lengths: torch.Tensor | None = None,
) -> int:
    """Validate shapes; return the number of image branches (0 when there are none)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, Lq, D], got {tuple(q.shape)}")
    batch, heads, _, head_dim = q.shape
    for name, tensor in (("k_text", k_text), ("v_text", v_text)):
        if tensor.dim() != 4 or tensor.shape[:2] != (batch, heads) or tensor.shape[3] != head_dim:
            raise ValueError(f"{name} must be [{batch}, {heads}, Lt, {head_dim}], got {tuple(tensor.shape)}")
    if k_text.shape != v_text.shape or k_text.shape[2] == 0:
        raise ValueError("k_text and v_text must have the same non-empty shape")
    if k_image is None or k_image.shape[1] == 0:
        return 0
    if v_image is None or image_scales is None or image_present is None:
        raise ValueError("image branches need v_image, image_scales and image_present")
    if k_image.dim() != 5 or k_image.shape != v_image.shape:
        raise ValueError(f"k_image and v_image must be [B, NB, H, Li, D], got {tuple(k_image.shape)}")
    num_branches = k_image.shape[1]
    if k_image.shape[0] != batch or k_image.shape[2] != heads or k_image.shape[4] != head_dim:
        raise ValueError(
            f"k_image must be [{batch}, NB, {heads}, Li, {head_dim}], got {tuple(k_image.shape)}"
        )
    if tuple(image_scales.shape) != (batch, num_branches) or tuple(image_present.shape) != (
        batch,
        num_branches,
    ):
        raise ValueError(f"image_scales and image_present must be [{batch}, {num_branches}]")
    if image_present.dtype != torch.bool:
        raise TypeError("image_present must be bool")
    if image_lengths is not None and (
        tuple(image_lengths.shape) != (batch, num_branches) or image_lengths.dtype != torch.int32
    ):
        raise ValueError(f"image_lengths must be [{batch}, {num_branches}] int32")
    return num_branches

"""Scaled multi-branch attention reference against an explicit-softmax oracle."""

from __future__ import annotations

import math

import pytest
import torch

from sdserve.kernels import scaled_multi_branch_attention
from sdserve.kernels.attention_reference import scaled_multi_branch_attention_reference


def make_inputs(batch, heads, q_len, text_len, num_branches, image_len, head_dim, dtype):
    q = torch.randn(batch, heads, q_len, head_dim).to(dtype)
    k_text = torch.randn(batch, heads, text_len, head_dim).to(dtype)
    v_text = torch.randn(batch, heads, text_len, head_dim).to(dtype)
    k_image = torch.randn(batch, num_branches, heads, image_len, head_dim).to(dtype)
    v_image = torch.randn(batch, num_branches, heads, image_len, head_dim).to(dtype)
    return q, k_text, v_text, k_image, v_image


def oracle(q, k_text, v_text, k_image, v_image, scales, present, lengths=None):
    """fp64 explicit softmax per row and branch."""

    def attend(q_row, k, v):
        weights = torch.softmax(q_row @ k.transpose(-1, -2) / math.sqrt(q_row.shape[-1]), dim=-1)
        return weights @ v

    q, k_text, v_text, k_image, v_image = (t.double() for t in (q, k_text, v_text, k_image, v_image))
    rows = []
    for row in range(q.shape[0]):
        out = attend(q[row], k_text[row], v_text[row])
        for branch in range(k_image.shape[1]):
            if present[row, branch]:
                length = int(lengths[row, branch]) if lengths is not None else k_image.shape[3]
                k = k_image[row, branch, :, :length]
                v = v_image[row, branch, :, :length]
                out = out + float(scales[row, branch]) * attend(q[row], k, v)
        rows.append(out)
    return torch.stack(rows)


# Row 0: one image branch; row 1: both, one at scale 0 (still computed, as diffusers does);
# row 2: no IP-Adapter at all.
SCALES = torch.tensor([[0.5, 1.0], [0.0, 0.7], [1.0, 1.0]])
PRESENT = torch.tensor([[True, False], [True, True], [False, False]])
LENGTHS = torch.tensor([[4, 16], [16, 5], [16, 16]], dtype=torch.int32)


@pytest.mark.parametrize("head_dim", [40, 64])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_reference_matches_oracle(head_dim, with_lengths) -> None:
    inputs = make_inputs(3, 2, 37, 77, 2, 16, head_dim, torch.float32)
    lengths = LENGTHS if with_lengths else None
    out = scaled_multi_branch_attention_reference(*inputs, SCALES, PRESENT, lengths)
    torch.testing.assert_close(out.double(), oracle(*inputs, SCALES, PRESENT, lengths), atol=1e-5, rtol=1e-5)


def test_absent_branch_is_skipped_not_multiplied() -> None:
    """NaN keys in absent branches must not reach the output; 0 * NaN would."""
    q, k_text, v_text, k_image, v_image = make_inputs(3, 2, 8, 77, 2, 4, 64, torch.float32)
    k_image[~PRESENT] = float("nan")
    out = scaled_multi_branch_attention(q, k_text, v_text, k_image, v_image, SCALES, PRESENT)
    assert torch.isfinite(out).all()
    # The row without any branch equals plain text attention.
    text_only = torch.nn.functional.scaled_dot_product_attention(q[2:], k_text[2:], v_text[2:])
    torch.testing.assert_close(out[2:], text_only)


def test_no_image_branches() -> None:
    q, k_text, v_text, _, _ = make_inputs(2, 2, 8, 77, 0, 4, 40, torch.float32)
    out = scaled_multi_branch_attention(q, k_text, v_text, None, None, None, None)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k_text, v_text))

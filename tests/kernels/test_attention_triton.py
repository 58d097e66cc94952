"""Triton scaled multi-branch attention (in Triton's interpreter) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from sdserve.kernels.attention_reference import scaled_multi_branch_attention_reference

from .test_attention import LENGTHS, PRESENT, SCALES, make_inputs

# tl.dot is wrong for bf16 in the interpreter, so bf16 is covered by the AOT compile only.
TOLERANCES = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 3e-3, "rtol": 3e-3}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [40, 64, 160])
def test_triton_matches_reference(interpreted, dtype, head_dim) -> None:
    inputs = make_inputs(3, 2, 70, 77, 2, 16, head_dim, dtype)
    expected = scaled_multi_branch_attention_reference(*inputs, SCALES, PRESENT, LENGTHS)
    out = interpreted["attention_triton"].scaled_multi_branch_attention_triton(
        *inputs, SCALES, PRESENT, LENGTHS
    )
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


def test_triton_without_branches_and_strided_q(interpreted) -> None:
    """q as diffusers makes it: [B, L, H*D] viewed as [B, H, L, D] (non-contiguous heads)."""
    batch, heads, q_len, head_dim = 2, 5, 33, 64
    q = torch.randn(batch, q_len, heads * head_dim).view(batch, q_len, heads, head_dim).transpose(1, 2)
    k_text = torch.randn(batch, heads, 77, head_dim)
    v_text = torch.randn(batch, heads, 77, head_dim)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k_text, v_text)
    out = interpreted["attention_triton"].scaled_multi_branch_attention_triton(
        q, k_text, v_text, None, None, None, None
    )
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
@pytest.mark.parametrize(("q_len", "image_len"), [(1, 4), (64, 16), (257, 4)])
def test_triton_grid(interpreted, dtype, head_dim, q_len, image_len) -> None:
    inputs = make_inputs(3, 2, q_len, 77, 2, image_len, head_dim, dtype)
    expected = scaled_multi_branch_attention_reference(*inputs, SCALES, PRESENT)
    out = interpreted["attention_triton"].scaled_multi_branch_attention_triton(*inputs, SCALES, PRESENT)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])

"""Small host-side helpers shared by the Triton wrappers."""

from __future__ import annotations

import torch

TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch's own TF32 switch; fp16/bf16 ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"

"""xformers' memory-efficient attention, import-guarded: the `attention = "xformers"` backend.

xformers ships CUDA kernels only, so the backend is usable where `xformers.ops` imports and the
engine runs on CUDA; anywhere else `xformers_unavailable` says why in one line, and the engine's
configuration is refused with it (engine/config.py) instead of failing on the first request.
Nothing here imports xformers at module level: `sdserve --help` and CPU hosts never load it.
"""

from __future__ import annotations

import importlib

import torch


def xformers_unavailable(device: torch.device) -> str | None:
    """Why xformers' attention cannot run on `device` (one line), or None when it can."""
    try:
        importlib.import_module("xformers.ops")
    except Exception as exc:  # ImportError, or a wheel built for another torch/CUDA failing at import
        return (f"xformers is not usable here ({type(exc).__name__}); install the xformers extra "
                f"(pip install 'sdserve[xformers]') built for this torch, or use attention = \"sdpa\"")
    if device.type != "cuda" or not torch.cuda.is_available():
        return (f"xformers' memory-efficient attention needs CUDA, and this engine runs on {device.type}; "
                "use attention = \"sdpa\"")
    return None


def memory_efficient_attention(
    q: torch.Tensor,  # [B, H, Lq, D]
    k: torch.Tensor,  # [B, H, Lk, D]
    v: torch.Tensor,  # [B, H, Lk, D]
) -> torch.Tensor:  # [B, H, Lq, D]
    """out = softmax(q k^T / sqrt(D)) v, by xformers.ops.memory_efficient_attention.

    Same signature and layout as F.scaled_dot_product_attention without mask or dropout (the
    engine's attention never passes either), so the two are interchangeable; xformers takes
    [B, L, H, D], which is how the processors produced q, k and v before splitting heads, so the
    transposes below are views and its inputs keep their last dimension contiguous.
    """
    import xformers.ops

    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, H, Lq, D] and k, v [B, H, Lk, D] expected, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, Lq, H, D] -> [B, H, Lq, D]

"""The UNet's attention backend (EngineConfig.attention), installed once per model at load.

"sdpa" leaves diffusers' own processors (AttnProcessor2_0: torch's scaled_dot_product_attention).
"xformers" installs `KernelAttnProcessor` with xformers' memory-efficient attention on every
attention layer; the adapter runtime's row-aware processors (ip_adapter.install_processors) keep
it as their plain path and pass its kernel to the IP-Adapter branch path, so every attention the
UNet computes goes through the chosen kernel. The availability of xformers and CUDA was checked
when the EngineConfig was made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdserve.engine.ip_adapter import attention_forward

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # q, k, v [B, H, L, D] -> [B, H, Lq, D]


class KernelAttnProcessor:
    """diffusers' AttnProcessor2_0 with `attend` as its attention kernel (no mask, no dropout)."""

    def __init__(self, attend: Attend, fallback: Any) -> None:
        self.attend = attend
        # SD UNets pass no attention mask; a caller that does gets diffusers' masked sdpa path
        # rather than a kernel call that would ignore the mask.
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return attention_forward(attn, hidden_states, encoder_hidden_states, temb, attend=self.attend)


def attention_kernel(attention: str) -> Attend | None:
    """The kernel of backend `attention`; None for "sdpa" (diffusers' processors stay)."""
    if attention == "xformers":
        from sdserve.kernels.attention_xformers import memory_efficient_attention

        return memory_efficient_attention
    return None


def install_attention(unet: torch.nn.Module, attention: str) -> None:
    """Put backend `attention`'s processor on every attention layer of `unet` (a no-op for sdpa)."""
    attend = attention_kernel(attention)
    if attend is None:
        return
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(KernelAttnProcessor(attend, AttnProcessor2_0()))

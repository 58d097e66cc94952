"""Multi-LoRA and scaled multi-branch attention: torch references (the CPU path) and Triton kernels.

Importing this package does not import Triton; the Triton modules load on the first CUDA call.
"""

from sdserve.kernels.attention import scaled_multi_branch_attention
from sdserve.kernels.attention_reference import scaled_multi_branch_attention_reference
from sdserve.kernels.lora import add_multi_lora, triton_available
from sdserve.kernels.lora_conv import add_multi_lora_conv, add_multi_lora_conv_reference
from sdserve.kernels.lora_meta import LoRABatchMeta, StackGroup
from sdserve.kernels.lora_reference import add_multi_lora_reference

__all__ = [
    "LoRABatchMeta",
    "StackGroup",
    "add_multi_lora",
    "add_multi_lora_conv",
    "add_multi_lora_conv_reference",
    "add_multi_lora_reference",
    "scaled_multi_branch_attention",
    "scaled_multi_branch_attention_reference",
    "triton_available",
]

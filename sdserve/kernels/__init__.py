"""Multi-LoRA dispatch and scaled multi-branch attention: Triton kernels, the CPU planner, torch oracles.

A wrapped layer makes one call per layer kind (`lora_linear`, `lora_conv2d`); dispatch picks the
Triton kernels on CUDA or the CPU planner (`lora_cpu`) and owns the plans and the merge budget
(`lora_state`). `lora_reference` holds the plain per-token oracles every path is tested against.

Importing this package does not import Triton; the Triton modules load on the first CUDA call.
"""

from sdserve.kernels.attention import scaled_multi_branch_attention
from sdserve.kernels.attention_reference import scaled_multi_branch_attention_reference
from sdserve.kernels.lora import add_multi_lora, lora_conv2d, lora_linear, triton_available
from sdserve.kernels.lora_conv import add_multi_lora_conv
from sdserve.kernels.lora_cpu import add_multi_lora_conv_cpu, add_multi_lora_cpu
from sdserve.kernels.lora_meta import LoRABatchMeta, StackGroup
from sdserve.kernels.lora_reference import add_multi_lora_conv_reference, add_multi_lora_reference
from sdserve.kernels.lora_state import LoRABatchState, LoRALayerState, ModulePool, RowStack

__all__ = [
    "LoRABatchMeta",
    "LoRABatchState",
    "LoRALayerState",
    "ModulePool",
    "RowStack",
    "StackGroup",
    "add_multi_lora",
    "add_multi_lora_conv",
    "add_multi_lora_conv_cpu",
    "add_multi_lora_conv_reference",
    "add_multi_lora_cpu",
    "add_multi_lora_reference",
    "lora_conv2d",
    "lora_linear",
    "scaled_multi_branch_attention",
    "scaled_multi_branch_attention_reference",
    "triton_available",
]

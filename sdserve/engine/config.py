"""The engine's configuration: one frozen dataclass, passed as one object."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ATTENTION_BACKENDS = ("sdpa", "xformers")


@dataclass(frozen=True)
class ResidencyConfig:
    """Where adapters live: host memory and a model's device slots (see engine.residency)."""

    device_slots: int = 16
    """Adapters resident in the device slot pools of one model at once."""
    host_budget_bytes: int = 4 << 30
    """Bytes of parsed adapter files (LoRAs, embeddings, hypernetworks) the residency store keeps
    (engine/store.py); least-recently-used ones no running request pins are dropped beyond it."""
    model_budget_bytes: int = 8 << 30
    """Bytes of conditioning models (ControlNets, IP-Adapters with their image encoders) the
    residency store keeps loaded on the engine's device; least-recently-used ones no running
    request pins are dropped beyond it. An SD1.5 ControlNet is ~1.4 GB in float32."""
    max_rank: int = 128
    """Highest LoRA rank accepted."""
    load_threads: int = 1
    """Background threads that read and validate adapter files and load conditioning models."""
    host_arena_bytes: int = 512 << 20
    """Host memory reserved (and touched, in the background) when a model first serves adapters,
    which adapter files are read into and reused as adapters leave; loads beyond it take fresh
    memory, whose first touch can cost more than the read (see adapters/host_memory.py). The
    default holds 16 slots' worth of SD1.5 rank-16 LoRAs (27 MB each)."""
    merge_budget_bytes: int = 512 << 20
    """CPU: bytes of per-stack merged weight copies held at once, for the modules where merging
    beats the factorized deltas (many tokens per row, narrow: SD's first UNet level; see
    kernels/lora_plan.py). SD1.5 at 512 px with LoRAs on the attention projections needs ~61 MB per
    distinct stack; 0 turns merging off."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch_rows: int = 16
    """Most UNet rows (images × CFG rows) stepped in one UNet call; a request's rows never split."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N"."""
    dtype: str = "auto"
    """"auto" (float32 on CPU, float16 on CUDA), "float32", "float16" or "bfloat16"."""
    max_decode_batch: int = 8
    """Most images decoded by the VAE in one call."""
    residency: ResidencyConfig = field(default_factory=ResidencyConfig)
    """Adapter tiers: slots, host budget, maximum rank."""
    prompt_syntax: str = "plain"
    """How prompts are read when a request does not say (its `prompt_syntax`): "plain" (text as
    written) or "a1111" (AUTOMATIC1111's weights, BREAK, chunks and <lora:> tags)."""
    max_admit_per_step: int = 16
    """Most queued requests prepared (prompts encoded, noise drawn) at one step boundary, so a burst
    of arrivals does not stall the running batch for long."""
    attention: str = "sdpa"
    """The UNet's attention kernel: "sdpa" (torch's scaled_dot_product_attention, every device) or
    "xformers" (xformers' memory-efficient attention; needs the xformers extra and CUDA, and is
    refused here with the reason where either is missing). IP-Adapter branches use the same kernel."""

    def __post_init__(self) -> None:
        from sdserve.errors import InvalidArgument

        if self.prompt_syntax not in ("plain", "a1111"):  # engine/prompt_syntax.py SYNTAXES
            raise InvalidArgument(f"[engine] prompt_syntax must be plain or a1111 (got {str(self.prompt_syntax)[:32]!r})")
        if self.attention not in ATTENTION_BACKENDS:
            raise InvalidArgument(f"[engine] attention must be sdpa or xformers (got {str(self.attention)[:32]!r})")
        if self.attention == "xformers":
            # Checked with the config, not at the first request: a server configured for xformers
            # on a host without it refuses to start, naming why.
            from sdserve.kernels import attention_xformers

            reason = attention_xformers.xformers_unavailable(self.torch_device())
            if reason is not None:
                raise InvalidArgument(f"[engine] attention = \"xformers\": {reason}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if self.torch_device().type == "cuda" else torch.float32
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]

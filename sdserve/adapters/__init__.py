"""Adapter files: parse, validate against a base model, convert to one in-memory form per kind.

LoRA (diffusers/PEFT and kohya layouts, conv "LoCon", Concept Sliders) and LyCORIS LoHa and LoKr
(kohya layout, served as their exact LoRA form: `adapters.lycoris`) are the kinds served today;
DoRA, kohya diff, OFT/BOFT, GLoRA and IA3 are refused with UnsupportedAdapterKind.
This package imports nothing of sdserve except the leaf module `sdserve.errors`.
"""

from sdserve.adapters.detect import Layout, check_kind, detect_layout, is_slider
from sdserve.adapters.embeddings import (
    ExtraRowsEmbedding,
    TextualInversion,
    TokenizedPrompt,
    embed_tokens,
    expand_prompt,
    extra_rows_of,
    load_embedding,
    placeholder_token_ids,
    tokenize_with_embeddings,
)
from sdserve.adapters.hypernetwork import Hypernetwork, HypernetworkMLP, apply_hypernetwork, load_hypernetwork
from sdserve.adapters.lora import (
    DEFAULT_MAX_RANK,
    MAX_SCALE,
    LoRAAdapter,
    LoRAModule,
    ParsedLoRA,
    load_lora,
    parse_lora_file,
    validate_lora,
)
from sdserve.adapters.lycoris import LycorisInfo
from sdserve.adapters.reader import MAX_HEADER_BYTES, MAX_TENSOR_ENTRIES, RawFile, read_safetensors
from sdserve.adapters.save import lora_state_dict, save_lora
from sdserve.adapters.targets import COMPONENTS, TargetSpec, spec_of, targets_of

__all__ = [
    "COMPONENTS",
    "DEFAULT_MAX_RANK",
    "Layout",
    "MAX_HEADER_BYTES",
    "MAX_SCALE",
    "MAX_TENSOR_ENTRIES",
    "LoRAAdapter",
    "LycorisInfo",
    "LoRAModule",
    "ParsedLoRA",
    "RawFile",
    "TargetSpec",
    "check_kind",
    "detect_layout",
    "is_slider",
    "load_lora",
    "lora_state_dict",
    "parse_lora_file",
    "read_safetensors",
    "save_lora",
    "spec_of",
    "targets_of",
    "validate_lora",
    # textual inversion and hypernetworks
    "ExtraRowsEmbedding",
    "Hypernetwork",
    "HypernetworkMLP",
    "TextualInversion",
    "TokenizedPrompt",
    "apply_hypernetwork",
    "embed_tokens",
    "expand_prompt",
    "extra_rows_of",
    "load_embedding",
    "load_hypernetwork",
    "placeholder_token_ids",
    "tokenize_with_embeddings",
]

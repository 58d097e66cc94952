"""Which adapter kind, and which LoRA layout, a safetensors file holds — judged from its keys.

Kinds are told apart by the parameter names each training tool writes (LyCORIS, kohya sd-scripts,
PEFT, diffusers). Served: LoRA (and LoCon) in every layout, DoRA (a LoRA with a magnitude vector
per module: PEFT "lora_magnitude_vector", LyCORIS "dora_scale"), and LyCORIS LoHa and LoKr in the
kohya layout LyCORIS writes ("lora_unet_..." / "lora_te_..." keys). Anything else is refused
here, before any tensor is converted, so a refused file costs no memory beyond its read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Literal

from sdserve.errors import AdapterError, UnsupportedAdapterKind

Layout = Literal["peft", "peft_legacy", "kohya"]

# Key fragments of the adapter kinds that are known but not served yet, in the order checked.
# Each kind is named as the user would know it, since the name reaches the client.
# LoHa and LoKr are served in the kohya layout only: their markers refuse them in other layouts.
LYCORIS_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")),
    ("lokr", ("lokr_w1", "lokr_w2", "lokr_t2")),
)
_UNSUPPORTED_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("boft", ("boft_",)),  # before OFT, whose markers a BOFT key holds too
    ("oft", ("oft_blocks", "oft_diag", "oft_r.")),
    ("ia3", (".on_input", "ia3_l")),
    ("glora", (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight")),
    # LoCon with Tucker decomposition: a third "mid" factor that a two-matrix LoRA lacks.
    ("lora-tucker", (".lora_mid.weight",)),
    ("lora-bias", (".lora_B.bias", ".lora_up.bias")),
    ("lora-embedding", ("lora_embedding_A", "lora_embedding_B")),
)

# Keys of textual-inversion embeddings: A1111 (emb_params, string_to_param), SDXL (clip_l/clip_g).
_EMBEDDING_KEYS = ("emb_params", "string_to_param", "string_to_token", "clip_l", "clip_g")

_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")
_LYCORIS_SUFFIXES = tuple(f".{marker}" for _, markers in LYCORIS_MARKERS for marker in markers) + (
    ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b")
# diffusers' attention-processor era (before PEFT): "...attn1.processor.to_q_lora.down.weight",
# "...conv1.lora.down.weight" (LoRACompatible layers), "...mlp.fc1.lora_linear_layer.down.weight".
_LEGACY_SUFFIXES = (".down.weight", ".up.weight")


def is_kohya_key(key: str) -> bool:
    return key.startswith("lora_unet_") or key.startswith(("lora_te_", "lora_te1_", "lora_te2_"))


def _is_legacy_key(key: str) -> bool:
    return key.endswith(_LEGACY_SUFFIXES) and ("_lora." in key or ".lora." in key or ".lora_linear_layer." in key)


def check_kind(name: str, keys: Iterable[str], metadata: Mapping[str, str]) -> None:
    """Raise unless the file is a LoRA or a kohya-layout LoHa/LoKr: UnsupportedAdapterKind for
    known other kinds, AdapterError "not a LoRA file" for embeddings and anything unrecognised."""
    keys = list(keys)
    # One string for the substring tests (no marker holds a newline, so none can match across
    # two keys): a search in C per marker instead of a Python loop over keys x markers.
    joined = "\n".join(keys)
    for kind, markers in _UNSUPPORTED_MARKERS:
        if any(marker in joined for marker in markers):
            raise UnsupportedAdapterKind(name, kind)
    for kind, markers in LYCORIS_MARKERS:
        # PEFT's LoHa/LoKr ("unet....hada_w1_a") and other non-kohya spellings are not read.
        if any(marker in joined for marker in markers) and any(
                marker in key and not is_kohya_key(key) for key in keys for marker in markers):
            raise UnsupportedAdapterKind(name, f"{kind} (outside the kohya/LyCORIS layout)")
    # kohya's "diff" networks store full weight differences instead of factors.
    if any(key.endswith((".diff", ".diff_b")) for key in keys):
        raise UnsupportedAdapterKind(name, "diff")
    if metadata_says_dora(metadata) and "lora_magnitude_vector" not in joined:
        raise AdapterError(name, "the file's config says use_dora, but it holds no lora_magnitude_vector keys")
    if not any(key.endswith(_PEFT_SUFFIXES + _KOHYA_SUFFIXES + _LYCORIS_SUFFIXES) or _is_legacy_key(key)
               for key in keys):
        if any(key in _EMBEDDING_KEYS or key.startswith("emb_params") for key in keys):
            raise AdapterError(name, "not a LoRA file (it holds a textual-inversion embedding)")
        raise AdapterError(name, "not a LoRA file (no LoRA weight keys found)")


def metadata_says_dora(metadata: Mapping[str, str]) -> bool:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return False
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        return False  # reported by the PEFT parser, which needs the config
    if not isinstance(config, dict):
        return False
    return any(key.split(".")[-1] == "use_dora" and value is True for key, value in config.items())


def detect_layout(name: str, keys: Iterable[str]) -> Layout:
    """The one layout all LoRA keys of a file share; a file mixing layouts is refused."""
    layouts: set[Layout] = set()
    for key in keys:
        if is_kohya_key(key):
            layouts.add("kohya")
        elif key.endswith(_PEFT_SUFFIXES):
            layouts.add("peft")
        elif _is_legacy_key(key):
            layouts.add("peft_legacy")
    if len(layouts) != 1:
        problem = "no LoRA weight keys found" if not layouts else "mixes LoRA key layouts " + "/".join(sorted(layouts))
        raise AdapterError(name, problem)
    return layouts.pop()


def is_slider(metadata: Mapping[str, str]) -> bool:
    """Whether the file is a Concept Slider.

    The sliders project (rohitgandikota/sliders, after LECO) saves a kohya-style LoRANetwork
    whose metadata holds the training "prompts" (target/positive/unconditional/neutral) and its
    "config" as JSON; sdserve's own save_lora writes "sdserve_slider". Weights alone cannot tell
    a slider from a LoRA: sliders stripped of metadata load as plain LoRAs.
    """
    if metadata.get("sdserve_slider") == "true":
        return True
    return "prompts" in metadata and "config" in metadata

"""Adapter files: bytes -> every parser a tenant's upload or request reaches.

One input is one file, fed to all of them (the server cannot know a file's kind before it has
read it, and a LoRA mutated into an embedding-looking file is exactly the kind of input wanted):
the safetensors reader (from bytes and from a path, copied and shared), format detection, LoRA
loading against tiny-sd1's and tiny-sdxl's modules (PEFT, kohya, sgm and legacy key layouts),
textual-inversion embeddings against both models' text encoders, and hypernetworks against
tiny-sd1's attention widths.

The same input also builds a well-formed safetensors file (`structured_file`): keys of real
tiny-sd1 modules in each layout, factor shapes right or slightly wrong, any dtype, ranks, alphas,
PEFT configs and values at the edges. Byte mutations of a real file mostly break its JSON
header; these reach the LoRA, embedding and hypernetwork checks behind the reader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from tests.fuzz.common import Choices, typed_errors_only

# Packages whose Python code gives libFuzzer its coverage (atheris instruments them on import).
INSTRUMENT = ("sdserve",)
MODULES = (
    "sdserve.adapters",
    "sdserve.adapters.reader",
    "sdserve.adapters.detect",
    "sdserve.adapters.lora",
    "sdserve.adapters.formats.peft",
    "sdserve.adapters.formats.kohya",
    "sdserve.adapters.formats.sgm",
    "sdserve.adapters.lycoris",
    "sdserve.adapters.embeddings",
    "sdserve.adapters.hypernetwork",
    "sdserve.adapters.targets",
)

NAME = "fuzz.safetensors"  # how errors name the file; not a pickle suffix, so every check runs

_state: dict[str, Any] = {}


def _targets(model: str) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdserve.adapters import targets_of
    from sdserve.models.builtin import builtin_path

    path = builtin_path(model)
    components: dict[str, torch.nn.Module] = {
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
    }
    if (path / "text_encoder_2").is_dir():
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
    return targets_of(components)


def setup(workdir: Path) -> None:
    from sdserve.engine.model import read_model_info
    from sdserve.models.builtin import builtin_path

    sd1 = read_model_info("tiny-sd1", builtin_path("tiny-sd1"))
    sdxl = read_model_info("tiny-sdxl", builtin_path("tiny-sdxl"))
    _state.update(
        workdir=Path(workdir),
        sd1_targets=_targets("tiny-sd1"),
        sdxl_targets=_targets("tiny-sdxl"),
        sd1_text=sd1.text_widths,
        sdxl_text=sdxl.text_widths,
        sd1_attention=sd1.attention_widths,
    )
    _state["sd1_names"] = sorted(_state["sd1_targets"])


# safetensors dtype name -> torch dtype, for the values written; the reader's full list.
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_ELEMENTS = 1 << 16  # per tensor: a structured file stays small, whatever the shapes say


def _tensor(choices: Choices, shape: list[int], dtype_name: str) -> torch.Tensor | None:
    if any(d < 0 for d in shape) or _numel(shape) > _MAX_ELEMENTS:
        return None
    fill = choices.below(4)
    values = torch.empty(shape, dtype=torch.float64)
    if fill == 0:
        generator = torch.Generator().manual_seed(choices.byte())
        values = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.1
    else:
        values.fill_(choices.number() if fill == 1 else (0.0, 1.0)[fill - 2])
    if _DTYPES[dtype_name].is_floating_point:
        with torch.no_grad():
            return values.to(_DTYPES[dtype_name])
    return values.nan_to_num().clamp(-100, 100).to(_DTYPES[dtype_name])


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """safetensors bytes, written here (not by the library) so any key, dtype and shape goes."""
    names = {dtype: name for name, dtype in _DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    chunks, offset = [], 0
    for key, tensor in tensors.items():
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[key] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _perturb(choices: Choices, shape: list[int]) -> list[int]:
    """The right shape most of the time; else one dimension off, or one too many or too few."""
    change = choices.below(32)
    if change == 0 and shape:
        index = choices.below(len(shape))
        return [d + choices.pick((1, -1, 1000)) if i == index else d for i, d in enumerate(shape)]
    if change == 1:
        return shape[:-1]
    if change == 2:
        return [*shape, 1]
    return shape


def _lora_tensors(choices: Choices) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    from sdserve.adapters.targets import portable_path

    targets = _state["sd1_targets"]
    layout = choices.pick(("peft", "kohya", "legacy"))
    tensors: dict[str, torch.Tensor] = {}
    paths = []
    for _ in range(1 + choices.below(4)):
        target = choices.pick(_state["sd1_names"])
        spec = targets[target]
        component, _, path = target.partition(".")
        paths.append(path)
        rank = choices.mostly(choices.pick((1, 2, 4)), (0, 3, 64, 129))
        kernel = list(spec.kernel_size) if spec.kind == "conv" else []
        down = _perturb(choices, [rank, spec.in_features, *kernel])
        up = _perturb(choices, [spec.out_features, rank, *([1, 1] if kernel else [])])
        dtype = "F32" if choices.chance(160) else choices.pick(tuple(_DTYPES))
        if layout == "peft":
            stem, names = f"{component}.{portable_path(component, path)}", (".lora_A.weight", ".lora_B.weight")
        elif layout == "kohya":
            prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component]
            stem = prefix + portable_path(component, path).replace(".", "_")
            names = (".lora_down.weight", ".lora_up.weight")
        else:
            stem, names = f"{component}.{portable_path(component, path)}.lora", (".down.weight", ".up.weight")
        for suffix, shape in zip(names, (down, up)):
            tensor = _tensor(choices, shape, dtype)
            if tensor is not None and choices.chance(248):  # now and then a pair lacks a half
                tensors[stem + suffix] = tensor
        if layout == "kohya" and choices.chance(192):
            alpha_shape = choices.pick(([], [1], [2]))
            alpha = _tensor(choices, alpha_shape, choices.pick(("F32", "F16", "I64", "BF16", "BOOL")))
            if alpha is not None:
                tensors[stem + ".alpha"] = alpha
    metadata: dict[str, str] = {}
    if layout == "peft" and choices.chance(192):
        config: dict[str, Any] = {}
        for field in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora", "bogus"):
            if choices.chance(128):
                continue
            value: Any = choices.pick((choices.integer(), choices.number(), True, "x", None, []))
            if field.endswith("_pattern"):
                value = {choices.pick(paths + ["^" + paths[0], "a|b", "(a+)+$", ""]): choices.integer()
                         for _ in range(choices.below(3))}
            config[field if choices.chance(64) else f"unet.{field}"] = value
        metadata["lora_adapter_metadata"] = json.dumps(config)
    if choices.chance(32):
        metadata |= {"prompts": "[]", "config": "{}"} if choices.chance(128) else {"sdserve_slider": "true"}
    return tensors, metadata or None


def _embedding_tensors(choices: Choices) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    tensors = {}
    for _ in range(1 + choices.below(2)):
        key = choices.pick(("<token>", "emb_params", "clip_l", "clip_g", "<a b>", "", "\u0000", "x" * 101))
        shape = _perturb(choices, choices.pick(([2, 32], [32], [1, 32], [76, 32], [0, 32])))
        tensor = _tensor(choices, shape, "F32" if choices.chance(192) else choices.pick(tuple(_DTYPES)))
        if tensor is not None:
            tensors[key] = tensor
    return tensors, None


def _hypernetwork_tensors(choices: Choices) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    from sdserve.adapters.hypernetwork import METADATA_KEY

    structure = choices.mostly(choices.pick(([1, 2, 1], [1, 1], [1, 0.5, 1])),
                               ([1, 4, 4, 1], [2, 1], [1, 1e-9, 1], [1], [1, True, 1], [1, 17, 1]))
    config = {"format": choices.mostly(1, (2, "1", None)), "layer_structure": structure,
              "activation": choices.mostly(choices.pick(("relu", "linear", "swish", "mish")), ("prelu", 3, None)),
              "activate_output": choices.mostly(choices.pick((False, True)), (0, None)),
              "layer_norm": choices.mostly(choices.pick((False, True)), (1, "true"))}
    tensors = {}
    width = choices.mostly(choices.pick((32, 64)), (8, 0, 2**40))
    for side in choices.mostly("kv", ("k", "kvq", "vk")):
        for layer in range(len(structure) - 1):
            out = int(width * structure[layer + 1]) if isinstance(structure[layer + 1], int | float) else 1
            inp = int(width * structure[layer])
            params = {"weight": [out, inp], "bias": [out]}
            if config["layer_norm"]:
                params |= {"norm.weight": [out], "norm.bias": [out]}
            for param, shape in params.items():
                tensor = _tensor(choices, _perturb(choices, shape), "F32" if choices.chance(192) else "F16")
                if tensor is not None:
                    tensors[f"hypernetwork.{width}.{side}.{layer}.{param}"] = tensor
    return tensors, {METADATA_KEY: json.dumps(config)}


def structured_file(data: bytes) -> bytes:
    """A well-formed safetensors adapter file built from `data` (see the module docstring)."""
    choices = Choices(data)
    make = choices.pick((_lora_tensors, _lora_tensors, _embedding_tensors, _hypernetwork_tensors))
    return _serialize(*make(choices))


def _all_parsers(data: bytes, path: Path | None) -> None:
    from sdserve.adapters import detect, load_embedding, load_hypernetwork, load_lora, read_safetensors

    state = _state

    def read_and_detect() -> None:
        raw = read_safetensors(data, NAME, shared=True)
        detect.is_slider(raw.metadata)
        detect.check_kind(NAME, raw.tensors.keys(), raw.metadata)
        detect.detect_layout(NAME, raw.tensors.keys())

    typed_errors_only(read_and_detect)
    source = data if path is None else path
    if path is not None:
        typed_errors_only(lambda: read_safetensors(path, NAME))
    typed_errors_only(lambda: load_lora(data, NAME, state["sd1_targets"]))
    # sgm (SDXL original) names resolve only against an SDXL UNet; fp16 is the CUDA serving dtype.
    typed_errors_only(lambda: load_lora(source, NAME, state["sdxl_targets"], dtype=torch.float16, max_rank=64))
    typed_errors_only(lambda: load_embedding(data, NAME, state["sd1_text"]))
    typed_errors_only(lambda: load_embedding(source, NAME, state["sdxl_text"], token="<fuzz>"))
    typed_errors_only(lambda: load_hypernetwork(data, NAME, state["sd1_attention"]))


def one_input(data: bytes) -> None:
    # The server reads registered files from its blob store: the path reader is its own code
    # (one open handle, fstat-sized), so it gets the same input as the bytes reader.
    path = _state["workdir"] / "input.safetensors"
    path.write_bytes(data)
    _all_parsers(data, path)
    _all_parsers(structured_file(data), None)

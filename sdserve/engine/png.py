"""PNG output with the generation parameters in a text chunk ("parameters", as A1111 writes it),
and the reader of that chunk (A1111's `parse_generation_parameters`, for `generate --from-png`).

The text: the prompt, a `Negative prompt:` line when there is a negative prompt, then one line of
`Key: value` pairs, a value holding `,` `:` or a newline JSON-quoted (A1111's `quote`). Hashes
follow A1111's conventions (modules/hashes.py, extensions-builtin/Lora/network.py):
- `Model hash`: the first 10 hex of the checkpoint file's sha256 ("new style" short hash). Known
  for a model served from a single-file checkpoint (its converted directory is named by that
  sha256); a diffusers directory has no such file, and the key is left out.
- `Lora hashes`: `"name: hash, ..."`, hash = the first 12 hex of the LoRA's `sshs_model_hash`
  metadata when it has one, else of the "addnet" hash: sha256 of the safetensors file's bytes
  after its header (the tensor data), as kohya's sd-scripts and A1111 compute it.
- `TI hashes`: `"name: hash, ..."`, the first 12 hex of the embedding file's sha256.
ControlNet and IP-Adapter units as sd-webui-controlnet writes them (`ControlNet 0: "Module: canny,
Model: NAME, Weight: 1, Guidance Start: 0, Guidance End: 1"`; no model hash: a directory).
Keys A1111 does not have, for sdserve to re-run a request: `Lora stack` (`"name: scale start
end, ..."`), `Guidance interval`, `Prompt syntax`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import struct
import threading
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdserve.engine.request import EngineRequest
from sdserve.engine.schedulers import to_a1111

_hash_cache: dict[tuple[str, str, int, int], str] = {}
_hash_lock = threading.Lock()


def _cached(kind: str, path: str, compute) -> str:
    """A file's hash remembered per (path, size, mtime), so every PNG of a request stack does not
    re-read its LoRAs."""
    stat = os.stat(path)
    key = (kind, path, stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    value = compute(path)
    with _hash_lock:
        _hash_cache[key] = value
    return value


def _sha256(path: str, skip: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(skip)
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _lora_hash(path: str) -> str:
    if not path.lower().endswith(".safetensors"):
        return _sha256(path)  # A1111 hashes other formats whole
    with open(path, "rb") as handle:
        header_size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_size))
    metadata = header.get("__metadata__") or {}
    if isinstance(metadata.get("sshs_model_hash"), str) and metadata["sshs_model_hash"]:
        return metadata["sshs_model_hash"]
    return _sha256(path, skip=8 + header_size)


def lora_shorthash(path: str) -> str:
    """A1111's short hash of a LoRA file (12 hex; see the module docstring); "" when unreadable."""
    try:
        return _cached("lora", path, _lora_hash)[:12]
    except (OSError, ValueError, struct.error):
        return ""


def file_shorthash(path: str, length: int = 12) -> str:
    """The first `length` hex of a file's sha256 (A1111's TI and checkpoint short hashes)."""
    try:
        return _cached("sha256", path, _sha256)[:length]
    except OSError:
        return ""


def model_shorthash(model_path: Path) -> str:
    """A1111's `Model hash` of a served model: the single-file checkpoint's sha256[:10] when the
    model is a converted single file (its directory is named by that sha256), else ""."""
    from sdserve.models.single_file import SOURCE_FILE

    name = model_path.name
    if (model_path / SOURCE_FILE).is_file() and re.fullmatch(r"[0-9a-f]{64}", name):
        return name[:10]
    return ""


def network_name(name: str) -> str:
    """An adapter's name as A1111 lists it: no file suffix, no `:` or `,` (its hash-list separators)."""
    stem = Path(name).name
    for suffix in (".safetensors", ".pt", ".ckpt", ".bin"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem.replace(":", "").replace(",", "")


def quote(value: object) -> str:
    """A1111's `quote`: JSON-quote a value holding `,`, `:` or a newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def parameters_text(request: EngineRequest, image_index: int = 0, model_hash: str = "") -> str:
    """A1111-style parameters: prompt, negative prompt line, then `Key: value` pairs."""
    from sdserve import __version__

    lines = [request.prompt]
    # A1111 writes no line for an empty negative prompt; sdserve writes one for "" (not for an
    # absent one): SDXL encodes "" but zeroes an absent negative, and a re-run must tell them apart.
    if request.negative_prompt is not None:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    sampler, schedule = to_a1111(request.scheduler)
    pairs: dict[str, object] = {"Steps": request.steps, "Sampler": sampler}
    if schedule:
        pairs["Schedule type"] = schedule
    pairs.update({
        "CFG scale": f"{request.guidance_scale:g}",
        "Seed": request.seed,
        "Size": f"{request.width}x{request.height}",
    })
    if model_hash:
        pairs["Model hash"] = model_hash
    pairs["Model"] = request.model if "/" not in request.model else request.model.rstrip("/").rsplit("/", 1)[-1]
    if request.num_images > 1:
        pairs["Batch size"] = request.num_images
        pairs["Batch pos"] = image_index
    if request.init_image is not None:
        pairs["Denoising strength"] = f"{request.strength:g}"
    if request.clip_skip != 1:
        pairs["Clip skip"] = request.clip_skip  # A1111's key and meaning
    if (request.guidance_start, request.guidance_end) != (0.0, 1.0):
        pairs["Guidance interval"] = f"{request.guidance_start:g}-{request.guidance_end:g}"
    if request.prompt_syntax != "plain":
        pairs["Prompt syntax"] = request.prompt_syntax
    if request.adapters:
        names = [network_name(entry.name) for entry in request.adapters]
        pairs["Lora hashes"] = ", ".join(
            f"{name}: {lora_shorthash(entry.source)}" for name, entry in zip(names, request.adapters)
        )
        pairs["Lora stack"] = ", ".join(
            f"{name}: {entry.scale:g} {entry.start:g} {entry.end:g}" for name, entry in zip(names, request.adapters)
        )
    if request.embedding_refs:
        pairs["TI hashes"] = ", ".join(
            f"{network_name(entry.token or entry.name)}: {file_shorthash(entry.source)}"
            for entry in request.embedding_refs
        )
    # sd-webui-controlnet's form: one `ControlNet N` key per unit (IP-Adapters are units there too)
    units = [(unit.preprocess, unit.model, unit.scale, f", Guidance Start: {unit.start:g}, Guidance End: {unit.end:g}")
             for unit in request.controlnets]
    units += [("ip-adapter", unit.model, unit.scale, "") for unit in request.ip_adapters]
    for index, (module, model, scale, interval) in enumerate(units):
        pairs[f"ControlNet {index}"] = f"Module: {module}, Model: {network_name(model)}, Weight: {scale:g}{interval}"
    pairs["Version"] = f"sdserve {__version__}"
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in pairs.items()))
    return "\n".join(lines)


# A1111's modules/infotext_utils.py, verbatim regexes.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_parameters(text: str) -> dict[str, str]:
    """A1111's `parse_generation_parameters` (without its UI-side fix-ups): `Prompt`, `Negative
    prompt`, each key's string value (quoted ones unquoted), `Size` split as `Size-1`/`Size-2`,
    and `Clip skip` "1" when absent."""
    result: dict[str, str] = {}
    prompt, negative, in_negative = "", "", False
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for key, value in _RE_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            with contextlib.suppress(ValueError):  # A1111's unquote keeps a bad quote as written
                value = json.loads(value)
        size = _RE_IMAGESIZE.match(value)
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    result["Prompt"] = prompt
    result["Negative prompt"] = negative
    result.setdefault("Clip skip", "1")
    return result


def parse_hash_list(value: str) -> list[tuple[str, str]]:
    """`"name: hash, name2: hash2"` (A1111's Lora/TI hashes) -> [(name, hash), ...]."""
    pairs = []
    for item in value.split(","):
        name, _, digest = item.strip().rpartition(":")
        if item.strip():
            pairs.append((name.strip(), digest.strip()))
    return pairs


def read_parameters(data: bytes) -> str:
    """The `parameters` text chunk of PNG bytes ("" when it has none)."""
    with Image.open(io.BytesIO(data)) as image:
        return str(image.info.get("parameters", ""))


def encode_png(image: np.ndarray, parameters: str) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes carrying `parameters` (no text chunk when it is empty)."""
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def warm_up(model_paths: list[Path]) -> None:
    """Do once, at start, the first-use work of a response: PIL loads its format plugins on the
    first save, and the model hash reads the single-file module. Measured on the test server:
    the first burst after start spent ~40 ms of GIL-holding imports here, which delayed every
    refusal of that burst (its latencies were 45-70 ms against 10-25 ms for later bursts)."""
    encode_png(np.zeros((8, 8, 3), dtype=np.uint8), "warm-up")
    for path in model_paths:
        model_shorthash(path)

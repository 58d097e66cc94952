"""Single-file checkpoints: the original SD 1.x / 2.x / XL layout, served as a diffusers dir.

A `.safetensors` file in the layout users download (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*` or SDXL's `conditioner.embedders.*`) is converted
once by diffusers' own single-file loading, against architecture configs sdserve has on disk
(never the hub), and cached as a diffusers-format directory under
`$SDSERVE_HOME/models/single-file/<sha256 of the file>`, staged and renamed into place whole.

Which configs: the file names its family by its keys, not its sizes. The candidates of that
family are every built-in model's directory (tiny test models, the shipped `default`) and the
architecture configs in `sdserve/models/architectures/` (when present); the one chosen is the
one whose modules, built on the meta device, have exactly the shapes diffusers' converters give
the file's tensors (read from the header; no weights are read for the match). A file no
candidate fits is refused with what did not fit; `config_dir` names one explicitly.

Pickles (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused unopened: unpickling runs code the file
chooses. Files that are not checkpoints (LoRAs, embeddings, VAEs, ControlNets, diffusers
component files) are refused naming what they look like.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdserve.errors import InvalidArgument
from sdserve.paths import fsync_dir

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."
ARCHITECTURES_DIR = Path(__file__).parent / "architectures"
SOURCE_FILE = "sdserve-source.json"  # in a converted dir: what it was converted from


@dataclass(frozen=True)
class CheckpointHeader:
    """What a safetensors header says, without the data: every tensor's shape and dtype."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype names ("F16", "F32", "BF16", ...)


def _refuse(path: Path, problem: str) -> InvalidArgument:
    # The file's name only: a path may be a server's.
    return InvalidArgument(f"model file {path.name!r}: {problem}", field="model")


def refuse_pickle(path: Path) -> InvalidArgument:
    return _refuse(
        path,
        "is a pickle checkpoint, which sdserve never opens (unpickling runs code the file chooses); "
        "convert it to .safetensors first, e.g. with `safetensors.torch.save_file` on the state dict "
        "loaded where you trust it, or a converter such as A1111's / kohya's",
    )


def read_header(path: Path) -> CheckpointHeader:
    """Shapes and dtypes of every tensor in the safetensors file at `path`; no data is read."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    with path.open("rb") as handle:
        head = handle.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise refuse_pickle(path)  # a zip (torch.save) or raw pickle under another suffix
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes, dtypes = {}, {}
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                piece = handle.get_slice(key)
                shapes[key] = tuple(int(n) for n in piece.get_shape())
                dtypes[key] = str(piece.get_dtype())
    except (SafetensorError, OSError, ValueError) as exc:
        raise _refuse(path, f"is not a readable safetensors file ({exc.__class__.__name__})") from None
    return CheckpointHeader(shapes=shapes, dtypes=dtypes)


def _looks_like(keys: set[str]) -> str:
    """What a file without an SD UNet holds, for the refusal."""
    joined = "\n".join(keys)
    if re.search(r"lora_(down|up|A|B)\b|\.lora_|^lora_|hada_w|lokr_w|\.alpha$|dora_scale", joined, re.M):
        return "a LoRA / LyCORIS adapter, not a model: pass it per request (--lora FILE)"
    if keys & {"emb_params", "clip_l", "clip_g"} or "string_to_param" in joined:
        return "a textual-inversion embedding, not a model: pass it per request (--embedding FILE)"
    if any(k.startswith("control_model.") or k.startswith("controlnet_cond_embedding.") for k in keys):
        return "a ControlNet, not a model: serve it with [models.controlnets] (a diffusers directory)"
    vae_prefixes = ("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.", VAE_PREFIX)
    if any(k.startswith(vae_prefixes) for k in keys):
        return "a VAE alone, not a model: pass it with --vae"
    if any(k.startswith(("down_blocks.", "text_model.", "mid_block.")) for k in keys):
        return "one component of a diffusers-format model: pass the model's directory instead"
    return "not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)"


def detect_family(path: Path, header: CheckpointHeader) -> str:
    """"sd1" | "sd2" | "sdxl" from the file's keys; InvalidArgument naming what it looks like otherwise."""
    keys = set(header.shapes)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise _refuse(path, f"looks like {_looks_like(keys)}")
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise _refuse(path, "holds a UNet but no VAE (first_stage_model.*); sdserve needs the whole checkpoint")
    if any(k.startswith(SDXL_TEXT_2_PREFIX) for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise _refuse(path, "looks like an SDXL refiner (one OpenCLIP text encoder), which sdserve does not serve")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise _refuse(path, "holds a UNet but no text encoder this loader knows (cond_stage_model.* / conditioner.embedders.*)")


# ---------------------------------------------------------------------------------------------
# Which architecture configs fit: the converters run on meta tensors of the header's shapes.


def _meta_checkpoint(header: CheckpointHeader) -> dict[str, Any]:
    import torch

    return {key: torch.empty(shape, device="meta") for key, shape in header.shapes.items()}


def _expected_shapes(build: Callable[[], Any]) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = build()
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _mismatch(expected: dict[str, tuple[int, ...]], converted: dict[str, Any]) -> str | None:
    """First key the converted file lacks or has at another shape; None when it fits."""
    for key, shape in expected.items():
        plain = key.removeprefix("text_model.")
        value = converted.get(key, converted.get(plain, converted.get(f"text_model.{key}")))
        if value is None:
            if key.endswith("position_ids"):
                continue
            return f"{key} missing"
        if tuple(value.shape) != shape:
            return f"{key} is {list(value.shape)}, the config needs {list(shape)}"
    return None


def _text_fits(config_dir: Path, subfolder: str, checkpoint: dict[str, Any], prefix: str | None) -> str | None:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(config_dir, subfolder=subfolder, local_files_only=True)
    architectures = config.architectures or []
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in architectures else CLIPTextModel
    expected = _expected_shapes(lambda: cls(config))
    if prefix is None:  # OpenAI CLIP, HF names under a prefix
        converted = convert_ldm_clip_checkpoint(checkpoint)
    else:
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = cls(config)
        converted = convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
    problem = _mismatch(expected, converted)
    return f"{subfolder}: {problem}" if problem else None


def _architecture_fits(config_dir: Path, family: str, header: CheckpointHeader) -> str | None:
    """None when the configs at `config_dir` take the file's tensors exactly, else the first misfit."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet_config = UNet2DConditionModel.load_config(config_dir, subfolder="unet", local_files_only=True)
    # The first convolution tells most architectures apart before anything is built.
    conv_in = header.shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", ())[:2]
    wanted = (unet_config["block_out_channels"][0], unet_config.get("in_channels", 4))
    if tuple(conv_in) != tuple(wanted):
        return f"unet: conv_in.weight is {list(conv_in)}, the config needs {list(wanted)}"
    checkpoint = _meta_checkpoint(header)
    try:
        converted = convert_ldm_unet_checkpoint(checkpoint, unet_config)
    except (KeyError, IndexError, TypeError) as exc:
        return f"unet: the converter failed ({exc.__class__.__name__}: {exc})"
    problem = _mismatch(_expected_shapes(lambda: UNet2DConditionModel.from_config(unet_config)), converted)
    if problem:
        return f"unet: {problem}"
    vae_config = AutoencoderKL.load_config(config_dir, subfolder="vae", local_files_only=True)
    try:
        converted = convert_ldm_vae_checkpoint(checkpoint, vae_config)
    except (KeyError, IndexError, TypeError) as exc:
        return f"vae: the converter failed ({exc.__class__.__name__}: {exc})"
    problem = _mismatch(_expected_shapes(lambda: AutoencoderKL.from_config(vae_config)), converted)
    if problem:
        return f"vae: {problem}"
    if family == "sdxl":
        first = {k: v for k, v in checkpoint.items() if k.startswith("conditioner.embedders.0.")}
        return _text_fits(config_dir, "text_encoder", first, None) or _text_fits(
            config_dir, "text_encoder_2", checkpoint, SDXL_TEXT_2_PREFIX
        )
    if family == "sd2":
        return _text_fits(config_dir, "text_encoder", checkpoint, "cond_stage_model.model.")
    return _text_fits(config_dir, "text_encoder", checkpoint, None)


def architecture_candidates(family: str) -> list[Path]:
    """Config directories of `family` sdserve has: shipped architectures, then built-in models."""
    from sdserve.models.builtin import builtin_path
    from sdserve.models.configs import BUILTIN_SPECS

    found: list[Path] = []
    if ARCHITECTURES_DIR.is_dir():
        for directory in sorted(ARCHITECTURES_DIR.iterdir()):
            meta = directory / "sdserve.json"
            if meta.is_file() and json.loads(meta.read_text()).get("family") == family:
                found.append(directory)
    for name, spec in BUILTIN_SPECS.items():
        if spec.family == family:
            found.append(builtin_path(name))  # a tiny one is built on first use (~1 s)
    return found


def match_architecture(path: Path, family: str, header: CheckpointHeader) -> Path:
    misfits = []
    for candidate in architecture_candidates(family):
        problem = _architecture_fits(candidate, family, header)
        if problem is None:
            return candidate
        misfits.append(f"{candidate.name} ({problem})")
    raise _refuse(
        path,
        f"is an {family} checkpoint whose shapes fit no architecture sdserve ships: "
        + "; ".join(misfits),
    )


# ---------------------------------------------------------------------------------------------
# Conversion and the cache.


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def known_sha256(path: Path) -> str:
    """`file_sha256(path)`, remembered per (path, size, mtime, inode) in the cache's
    `digests.json`, so a server restart does not re-read a 7 GB file to find its directory."""
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    index_file = single_file_cache() / "digests.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = file_sha256(path)
    index[str(path)] = {"stamp": stamp, "sha256": digest}
    index_file.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".digests-", dir=index_file.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(index, indent=1))
    os.replace(temporary, index_file)  # whole or not at all; a lost update only costs a re-hash
    return digest


def _dominant_dtype(header: CheckpointHeader) -> str:
    unet = [dtype for key, dtype in header.dtypes.items() if key.startswith(UNET_PREFIX)]
    return max(set(unet), key=unet.count)


def convert(path: Path, family: str, header: CheckpointHeader, config_dir: Path, out_dir: Path) -> None:
    """Write the checkpoint at `path` as a diffusers-format directory at `out_dir` (which exists, empty)."""
    import diffusers
    import torch

    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(_dominant_dtype(header), torch.float32)
    model_index = json.loads((config_dir / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, model_index["_class_name"])
    components: dict[str, Any] = {}
    if family == "sdxl":
        # diffusers picks SDXL's second text encoder by width, so a model whose two encoders are
        # equally wide (the tiny test models) would get the first one twice: convert it alone.
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
        from safetensors import safe_open
        from transformers import CLIPTextModelWithProjection

        with safe_open(str(path), framework="pt") as handle:
            names = [k for k in handle.keys() if k.startswith(SDXL_TEXT_2_PREFIX)]  # noqa: SIM118 - not iterable
            second = {k: handle.get_tensor(k) for k in names}
        components["text_encoder_2"] = create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection, second, subfolder="text_encoder_2", config=str(config_dir),
            torch_dtype=dtype, local_files_only=True,
        )
    if not (config_dir / "tokenizer").is_dir():
        # A shipped architecture: CLIP's own tokenizer, built from the merges sdserve ships.
        from sdserve.models.tokenizer import write_openai_clip_tokenizer

        merges = ARCHITECTURES_DIR / "clip_merges.txt.gz"
        components["tokenizer"] = write_openai_clip_tokenizer(
            out_dir / ".tokenizer", merges, pad_token="!" if family == "sd2" else "<|endoftext|>"
        )
        if family == "sdxl":
            components["tokenizer_2"] = write_openai_clip_tokenizer(out_dir / ".tokenizer_2", merges, pad_token="!")
    pipeline = pipeline_class.from_single_file(
        str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype, **components
    )
    for scratch in (".tokenizer", ".tokenizer_2"):
        shutil.rmtree(out_dir / scratch, ignore_errors=True)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    meta_file = config_dir / "sdserve.json"
    if meta_file.is_file():  # the architecture's family, defaults and limits are the file's
        meta = json.loads(meta_file.read_text())
        meta.update(name=path.stem, description=f"{family} checkpoint {path.name} (architecture of {config_dir.name})")
        (out_dir / "sdserve.json").write_text(json.dumps(meta, indent=2) + "\n")


def converted_dir(path: Path, *, config_dir: Path | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """The diffusers-format directory of the single-file checkpoint at `path`, converting it on
    first use. Cached by the file's sha256: a renamed copy hits the cache, an edited file does not."""
    path = Path(path)
    header = read_header(path)
    family = detect_family(path, header)
    digest = known_sha256(path)
    target = single_file_cache() / digest
    if (target / SOURCE_FILE).is_file():
        return target
    config_dir = config_dir or match_architecture(path, family, header)
    if progress is not None:
        progress(f"converting {path.name} ({family}, configs of {config_dir.name}) into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=target.parent))
    try:
        try:
            convert(path, family, header, config_dir, staging)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            # diffusers' own complaint about the file (a missing tensor, a shape), on one line.
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise _refuse(path, f"could not be converted ({exc.__class__.__name__}: {first_line})") from exc
        source = {"file": path.name, "sha256": digest, "family": family, "architecture": config_dir.name}
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        fsync_dir(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process converted the same file first; its directory is the same model.
            if not (target / SOURCE_FILE).is_file():
                raise
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def single_file_cache() -> Path:
    from sdserve.paths import cache_root

    return cache_root() / "models" / "single-file"


def is_single_file(path: Path) -> bool:
    """True for a path the model store should treat as a single-file checkpoint (or refuse as one)."""
    return path.is_file() and (path.suffix.lower() == ".safetensors" or path.suffix.lower() in PICKLE_SUFFIXES)

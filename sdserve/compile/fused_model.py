"""`compile fuse` / `compile unfuse`: a new diffusers model directory with a stack folded in or out.

The output is staged beside OUT (the base's files copied, minus the weights rewritten here) and
renamed into place whole (`trainers/output.py`), so OUT is either the finished model or absent;
the base directory is only read. Its `sdserve.json` keeps the base's family, defaults and limits
and records what was folded (`compile` section: sdserve version, base and its digest, every
adapter by sha256 and scale), so `unfuse` can refuse a stack other than the one fused in.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdserve import __version__
from sdserve.compile.fuse import add_embeddings, check_fusable, fold
from sdserve.compile.source import (
    BaseModel,
    EmbeddingArg,
    LoRAArg,
    check_out_dir,
    describe_model,
    file_sha256,
    load_base,
    load_embeddings,
    load_stack,
)
from sdserve.errors import InvalidArgument
from sdserve.models.builtin import METADATA_FILE

_ENCODER_DIRS = ("text_encoder", "text_encoder_2")
_TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")


@dataclass(frozen=True)
class FuseConfig:
    """One fuse or unfuse; the `sdserve compile fuse|unfuse` flags mirror these fields."""

    model: str
    """The model to start from: a built-in name or a diffusers directory (never written)."""
    out: Path
    """The model directory to write (refused if it exists, unless `force`)."""
    loras: tuple[LoRAArg, ...] = ()
    """The LoRA stack, each at its scale, in order."""
    embeddings: tuple[EmbeddingArg, ...] = ()
    """Textual-inversion embeddings to add as tokens (fuse only)."""
    force: bool = False
    """Replace OUT if it exists."""
    progress: bool = True
    """Show a progress bar."""


@dataclass(frozen=True)
class FuseResult:
    out: Path
    modules: int  # weights changed
    tokens: tuple[str, ...]  # tokens added
    max_relative_error: float | None = None  # unfuse: against the recorded base, where it is at hand
    compared_with: str = ""  # what max_relative_error compares against


def stored_dtype(component_dir: Path) -> torch.dtype:
    """The dtype a component's weights are stored in (its first floating tensor), so a fused
    float16 checkpoint stays float16 on disk; float32 where it cannot be told."""
    from safetensors import safe_open

    for file in sorted(component_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                dtype = handle.get_slice(key).get_dtype()
                if dtype in ("F16", "BF16", "F32"):
                    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    return torch.float32


def read_record(path: Path) -> dict[str, Any] | None:
    """The `compile` section of a model directory's sdserve.json, or None."""
    try:
        meta = json.loads((path / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    record = meta.get("compile") if isinstance(meta, dict) else None
    return record if isinstance(record, dict) else None


def _model_digest(path: Path) -> str:
    from sdserve.trainers.components import model_digest

    return model_digest(path)


def _write(staging: Path, name: str, base: BaseModel, changed: Sequence[str], tokens_added: bool,
           record: dict[str, Any], description: str) -> None:
    """Save the changed components (in their stored dtype), tokenizers and sdserve.json."""
    loaded = base.loaded
    modules = {"unet": loaded.unet, **dict(zip(_ENCODER_DIRS, loaded.text_encoders))}
    for component in changed:
        dtype = stored_dtype(base.path / component)
        if dtype == torch.float32:  # as loaded
            modules[component].save_pretrained(staging / component)
        else:
            modules[component].to(dtype).save_pretrained(staging / component)
            modules[component].to(torch.float32)
    if tokens_added:
        for directory, tokenizer in zip(_TOKENIZER_DIRS, loaded.tokenizers):
            shutil.rmtree(staging / directory, ignore_errors=True)  # no stale file beside the new ones
            tokenizer.save_pretrained(staging / directory)
    meta = {
        "name": name,
        "family": base.info.family,
        "description": description,
        "defaults": dataclasses.asdict(base.info.defaults),
        "limits": dataclasses.asdict(base.info.limits),
        "compile": record,
    }
    (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _stage_and_write(base: BaseModel, out: Path, changed: Sequence[str], tokens_added: bool,
                     record: dict[str, Any], description: str) -> None:
    from sdserve.trainers.output import replace_directory, stage_pipeline

    rewritten = list(changed) + (list(_TOKENIZER_DIRS[: len(base.loaded.tokenizers)]) if tokens_added else [])
    staging = stage_pipeline(base.path, out, rewritten)
    try:
        _write(staging, out.name, base, changed, tokens_added, record, description)
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _embedding_files(config: FuseConfig) -> list[Path]:
    return [arg.path for arg in config.embeddings]


def fuse_model(config: FuseConfig) -> FuseResult:
    """Write OUT: `config.model` with every LoRA folded in and every embedding added."""
    if not config.loras and not config.embeddings:
        raise InvalidArgument("nothing to fuse: give at least one --lora or --embedding", field="--lora")
    out = Path(config.out).expanduser().resolve()
    path, _ = describe_model(config.model)
    check_out_dir(out, config.force, [path])
    base = load_base(config.model)
    stack = load_stack(base, config.loras)
    embeddings = load_embeddings(base, config.embeddings)
    check_fusable(base.loaded.tokenizers, embeddings)
    report = fold(base.components, stack, progress=config.progress)
    added = add_embeddings(base.loaded.text_encoders, base.loaded.tokenizers, embeddings)
    changed = sorted(set(report.components) | set(added))
    record = {
        "kind": "fused",
        "sdserve_version": __version__,
        "base": config.model,
        "base_digest": _model_digest(base.path),
        "loras": [entry.record() for entry in stack],
        "embeddings": [{"file": path.name, "sha256": file_sha256(path), "token": embedding.token}
                       for path, embedding in zip(_embedding_files(config), embeddings)],
    }
    what = ", ".join([f"{e.path.name}:{e.scale:g}" for e in stack] + [e.token for e in embeddings])
    _stage_and_write(base, out, changed, bool(added), record, f"{config.model} with {what} fused in")
    tokens = tuple(dict.fromkeys(token for component_tokens in added.values() for token in component_tokens))
    return FuseResult(out, report.modules, tokens)


def _check_same_stack(record: dict[str, Any] | None, stack: Sequence, model: str) -> None:
    """Refuse a stack other than the one the directory records as fused (by sha256 and scale)."""
    if record is None or record.get("kind") != "fused":
        return  # a directory fused elsewhere: the caller knows its stack
    recorded = [(e.get("sha256"), float(e.get("scale", 1.0))) for e in record.get("loras", [])]
    given = [(entry.sha256, entry.scale) for entry in stack]
    if sorted(recorded) != sorted(given):
        names = ", ".join(f"{e.get('file')}:{float(e.get('scale', 1.0)):g}" for e in record.get("loras", []))
        raise InvalidArgument(f"{model} was fused with {names or 'no LoRA'}; unfuse takes the same files at the "
                              "same scales", field="--lora")


def _relative_error(unfused: BaseModel, reference: dict[str, torch.nn.Module], targets: Sequence[str]) -> float:
    """Largest max|W_back − W_base| / max|W_base| over the stack's weights."""
    worst = 0.0
    for target in targets:
        component, _, path = target.partition(".")
        ours = unfused.components[component].get_submodule(path).weight.double()
        theirs = reference[component].get_submodule(path).weight.double()
        scale = float(theirs.abs().max()) or 1.0
        worst = max(worst, float((ours - theirs).abs().max()) / scale)
    return worst


def unfuse_model(config: FuseConfig) -> FuseResult:
    """Write OUT: the fused `config.model` with the same LoRA stack subtracted. Tokens added by
    fuse stay (the tokenizer keeps them; they change nothing for prompts without them)."""
    if not config.loras:
        raise InvalidArgument("give the --lora stack that was fused in", field="--lora")
    if config.embeddings:
        raise InvalidArgument("unfuse takes LoRAs only; added tokens stay in the model", field="--embedding")
    out = Path(config.out).expanduser().resolve()
    path, _ = describe_model(config.model)
    check_out_dir(out, config.force, [path])
    fused = load_base(config.model)
    record = read_record(fused.path)
    if record is not None and record.get("sdserve_version") not in (None, __version__):
        raise InvalidArgument(f"{config.model} was fused by sdserve {record.get('sdserve_version')}, "
                              f"this is {__version__}; fuse it again", field="--model")
    stack = load_stack(fused, config.loras)
    _check_same_stack(record, stack, config.model)
    report = fold(fused.components, stack, sign=-1, progress=config.progress)
    targets = sorted({t for entry in stack for t in entry.adapter.modules})
    error, compared = None, ""
    base_name = (record or {}).get("base")
    if base_name:
        try:
            base = load_base(base_name)
        except InvalidArgument:
            base = None  # the recorded base is not on this machine: nothing to compare against
        if base is not None and _model_digest(base.path) == record.get("base_digest"):
            error, compared = _relative_error(fused, base.components, targets), base_name
    new_record = {"kind": "unfused", "sdserve_version": __version__, "from": config.model,
                  "loras": [entry.record() for entry in stack], "fused": record}
    _stage_and_write(fused, out, report.components, False, new_record, f"{config.model} with its stack unfused")
    return FuseResult(out, report.modules, (), error, compared)

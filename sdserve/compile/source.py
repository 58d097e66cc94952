"""What a compile command starts from: a base model, an adapter stack, and a new output directory.

The base model loads through the engine's own loader (`engine.model.load_model`) on the CPU in
float32, so a compiled artefact is made from exactly what the eager path serves. Adapters are
parsed and validated by `sdserve.adapters` against that model's modules: a LoRA made for another
family fails there, with the adapter's own one-line error. Every problem with the input is an
InvalidArgument naming the flag, raised before any work that writes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdserve.adapters.embeddings import TextualInversion, load_embedding
from sdserve.adapters.lora import MAX_SCALE, LoRAAdapter, load_lora
from sdserve.adapters.targets import TargetSpec, targets_of
from sdserve.errors import AdapterError, InvalidArgument, NotFound, UnsupportedAdapterKind


@dataclass(frozen=True)
class LoRAArg:
    """One `--lora FILE[:SCALE]`."""

    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class EmbeddingArg:
    """One `--embedding FILE[:TOKEN]` (without TOKEN: the file's own token, or its stem)."""

    path: Path
    token: str | None = None


def parse_lora_arg(text: str) -> LoRAArg:
    """`FILE` or `FILE:SCALE`; a colon followed by something that is not a number is part of FILE."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            return LoRAArg(Path(text))
        if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise InvalidArgument(f"{text}: scale must be a finite number within ±{MAX_SCALE:g}", field="--lora")
        return LoRAArg(Path(path), scale)
    return LoRAArg(Path(text))


def parse_embedding_arg(text: str) -> EmbeddingArg:
    """`FILE` or `FILE:TOKEN`, split at the last colon after the file's suffix."""
    head, sep, tail = text.rpartition(":")
    if sep and head.endswith(".safetensors") and tail:
        return EmbeddingArg(Path(head), tail)
    return EmbeddingArg(Path(text))


@dataclass
class BaseModel:
    """A model loaded for compiling: float32 on the CPU, every weight frozen."""

    name: str  # as the user named it
    path: Path  # its diffusers directory
    info: Any  # engine.model.ModelInfo
    loaded: Any  # engine.model.LoadedModel
    targets: dict[str, TargetSpec] = field(repr=False)

    @property
    def components(self) -> dict[str, nn.Module]:
        """The modules adapters target, under the component names adapter files use."""
        return self.loaded.adapter_components()

    @property
    def widths(self) -> dict[str, int]:
        return dict(self.info.text_widths)


def resolve_model_dir(name: str, flag: str = "--model") -> Path:
    """The diffusers directory of a built-in name or a path; one-line error naming `flag`."""
    from sdserve.models.builtin import builtin_names, builtin_path

    if name in builtin_names():
        return builtin_path(name)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise InvalidArgument(f"unknown model {name!r}: neither a built-in model "
                              f"({', '.join(builtin_names())}) nor a directory", field=flag)
    return path.resolve()


def describe_model(name: str, flag: str = "--model") -> tuple[Path, Any]:
    """(directory, ModelInfo) of `name`, without loading weights."""
    from sdserve.engine.model import read_model_info

    path = resolve_model_dir(name, flag)
    try:
        return path, read_model_info(name, path)
    except NotFound as error:
        raise InvalidArgument(f"{name}: {error.message}", field=flag) from None


def load_base(name: str, flag: str = "--model") -> BaseModel:
    """Load `name` (built-in or directory) as the eager engine does, in float32 on the CPU."""
    from sdserve.engine.model import load_model

    path, info = describe_model(name, flag)
    loaded = load_model(info, torch.device("cpu"), torch.float32)
    for module in (loaded.unet, loaded.vae, *loaded.text_encoders):
        module.requires_grad_(False).eval()
    return BaseModel(name=name, path=path, info=info, loaded=loaded, targets=targets_of(loaded.adapter_components()))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class StackLoRA:
    """A validated LoRA of the stack with the scale it is compiled at."""

    adapter: LoRAAdapter
    scale: float
    sha256: str
    path: Path

    def record(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale}


def _check_file(path: Path, flag: str) -> None:
    if not path.is_file():
        raise InvalidArgument(f"{path}: no such file", field=flag)
    if path.suffix != ".safetensors":
        raise InvalidArgument(f"{path}: adapters are read from .safetensors files only "
                              "(convert others with `sdserve adapters convert`)", field=flag)


def load_stack(base: BaseModel, loras: Sequence[LoRAArg]) -> list[StackLoRA]:
    """Every --lora validated against the base model's modules (float32, for exact folding)."""
    return load_stack_for(base.targets, base.info.family, loras)


def load_stack_for(targets: Mapping[str, TargetSpec], family: str, loras: Sequence[LoRAArg]) -> list[StackLoRA]:
    """Every --lora validated against `targets` (a model's, or a compiled graph's)."""
    stack = []
    for arg in loras:
        _check_file(arg.path, "--lora")
        try:
            adapter = load_lora(str(arg.path), arg.path.name, targets, dtype=torch.float32)
        except UnsupportedAdapterKind as error:
            raise InvalidArgument(error.message, field="--lora") from None
        except AdapterError as error:  # a shape or module mismatch: most often a file for another family
            raise InvalidArgument(f"{error.message} (is it for a {family} model?)", field="--lora") from None
        stack.append(StackLoRA(adapter, arg.scale, file_sha256(arg.path), arg.path))
    return stack


def load_embeddings(base: BaseModel, embeddings: Sequence[EmbeddingArg]) -> list[TextualInversion]:
    """Every --embedding validated against the base model's text encoders."""
    loaded = []
    for arg in embeddings:
        _check_file(arg.path, "--embedding")
        try:
            loaded.append(load_embedding(str(arg.path), arg.path.stem, base.widths, token=arg.token))
        except AdapterError as error:
            raise InvalidArgument(error.message, field="--embedding") from None
    return loaded


def check_out_dir(out: Path, force: bool, inputs: Sequence[Path], flag: str = "--out") -> None:
    """Refuse an OUT that exists (without --force), that is or holds or lies inside an input (the
    inputs are never written), or whose parent is missing or not writable."""
    from sdserve.trainers.output import check_directory_writable

    out = Path(out).expanduser().resolve()
    for source in inputs:
        source = Path(source).resolve()
        if out == source or source.is_relative_to(out) or out.is_relative_to(source):
            raise InvalidArgument(f"{out} is or overlaps the input {source}, which compile never writes; "
                                  "choose another directory", field=flag)
    if out.exists() and not force:
        raise InvalidArgument(f"{out} exists; pass --force to replace it", field=flag)
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"{out} exists and is not a directory", field=flag)
    if not out.parent.is_dir():
        raise InvalidArgument(f"directory {out.parent} does not exist", field=flag)
    check_directory_writable(out.parent, flag)

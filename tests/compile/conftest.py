"""Adapters for the compile tests, made by PEFT against tiny-sd1's own modules (each with PEFT's
per-module delta as an independent oracle), and the CLI run in process."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig

from sdserve.models.builtin import builtin_path
from tests.adapters.lora_factory import (
    CLIP_ATTENTION,
    UNET_ATTENTION,
    UNET_CONV,
    FactoryLoRA,
    make_peft_lora,
    write_lora,
)
from tests.engine.lora_cases import model_components

MODEL = "tiny-sd1"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`sdserve ARGS` in process: (exit code, stdout, stderr), whether main returns or exits."""
    from sdserve.cli.main import main

    try:
        code = main([*args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree_digest(directory: Path) -> dict[str, str]:
    """Every file under `directory` (relative path -> sha256 of its bytes)."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, object]:
    """Two LoRAs for tiny-sd1 (a: attention + text encoder, PEFT layout; b: LoCon convs too,
    kohya layout), one for tiny-sdxl, and a single-vector and a two-vector embedding."""
    directory = tmp_path_factory.mktemp("compile-adapters")
    components = model_components(MODEL)
    a = make_peft_lora(components, {
        "unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_ATTENTION),
        "text_encoder": LoraConfig(r=4, lora_alpha=8, target_modules=CLIP_ATTENTION),
    }, seed=1)
    b = make_peft_lora(components, {"unet": LoraConfig(r=8, lora_alpha=4, target_modules=UNET_ATTENTION + UNET_CONV)},
                       seed=2)
    write_lora(a, directory / "a.safetensors", layout="peft")
    write_lora(b, directory / "b.safetensors", layout="kohya")
    xl = make_peft_lora(model_components("tiny-sdxl"), {"unet": LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"])})
    write_lora(xl, directory / "xl.safetensors", layout="peft")
    width = components["text_encoder"].config.hidden_size
    generator = torch.Generator().manual_seed(5)
    safetensors.torch.save_file({"<toy>": torch.randn(1, width, generator=generator)}, directory / "toy.safetensors")
    safetensors.torch.save_file({"emb_params": torch.randn(2, width, generator=generator)}, directory / "two.safetensors")
    return {"dir": directory, "a": directory / "a.safetensors", "b": directory / "b.safetensors",
            "xl": directory / "xl.safetensors", "toy": directory / "toy.safetensors",
            "two": directory / "two.safetensors", "a_lora": a, "b_lora": b}


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory) -> Path:
    """tiny-sd1 exported to ONNX once for the session (refit and backend tests read it, never write it)."""
    from sdserve.compile.onnx_export import OnnxConfig, export_onnx

    out = tmp_path_factory.mktemp("onnx-export") / "tiny-sd1"
    assert not export_onnx(OnnxConfig(model=MODEL, out=out, progress=False)).failed
    return out


def base_dir() -> Path:
    return builtin_path(MODEL)


__all__ = ["FactoryLoRA", "MODEL", "adapters", "base_dir", "onnx_export", "run_cli", "tree_digest"]

"""Weight-file variants of diffusers directories: `diffusion_pytorch_model.fp16.safetensors`.

A directory that holds only variant files (as `save_pretrained(variant="fp16")` and many
downloads leave it) loads only when `variant="fp16"` is passed; this finds that out from the
files, so users never name it.
"""

from __future__ import annotations

import re
from pathlib import Path

# model.fp16.safetensors, diffusion_pytorch_model.fp16.safetensors, sharded
# diffusion_pytorch_model.fp16-00001-of-00002.safetensors and its index json.
_VARIANT = re.compile(r"^(?:model|diffusion_pytorch_model)\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.safetensors(?:\.index\.json)?$")
_PLAIN = re.compile(r"^(?:model|diffusion_pytorch_model)(?:-\d+-of-\d+)?\.safetensors(?:\.index\.json)?$")


def weights_variant(component_dir: Path) -> str | None:
    """The variant to load `component_dir` with: None when plain weights are there (they win),
    else the one variant its files carry ("fp16", "bf16", ...); None when there is none."""
    names = [p.name for p in component_dir.iterdir()] if component_dir.is_dir() else []
    if any(_PLAIN.match(name) for name in names):
        return None
    variants = sorted({m[1] for name in names if (m := _VARIANT.match(name))})
    if "fp16" in variants:
        return "fp16"
    return variants[0] if variants else None

"""Built-in models are deterministic diffusers directories with recorded defaults."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

from sdserve.models.builtin import build_model, builtin_path
from sdserve.models.configs import BUILTIN_SPECS, ModelDefaults


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


def test_build_is_deterministic(tmp_path):
    spec = BUILTIN_SPECS["tiny-sdxl"]
    build_model(spec, tmp_path / "a")
    build_model(spec, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_each_builtin_records_family_and_defaults():
    for name, spec in BUILTIN_SPECS.items():
        meta = json.loads((builtin_path(name) / "sdserve.json").read_text())
        assert meta["family"] == spec.family
        # Every ModelDefaults field is recorded, so a model directory states all its defaults.
        assert set(meta["defaults"]) == {f.name for f in fields(ModelDefaults)}
        assert ModelDefaults(**meta["defaults"]) == spec.defaults

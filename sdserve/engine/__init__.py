"""The engine: request types, step-level batcher, runner, model families, decode.

The names below load on first use (PEP 562), so that importing one light module of the engine
(`engine.model_limits`, which `sdserve.models` builds its specs from) does not import torch and
the whole engine with it, and `models` -> `engine.model_limits` is no import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Engine": "sdserve.engine.engine",
    "EngineEvent": "sdserve.engine.engine",
    "GenerationResult": "sdserve.engine.engine",
    "EngineConfig": "sdserve.engine.config",
    "ModelInfo": "sdserve.engine.model",
    "ModelStore": "sdserve.engine.model",
    "EngineRequest": "sdserve.engine.request",
    "RequestSpec": "sdserve.api.types",
    "resolve": "sdserve.engine.request",
}

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineEvent",
    "EngineRequest",
    "GenerationResult",
    "ModelInfo",
    "ModelStore",
    "RequestSpec",
    "resolve",
]

if TYPE_CHECKING:
    from sdserve.api.types import RequestSpec
    from sdserve.engine.config import EngineConfig
    from sdserve.engine.engine import Engine, EngineEvent, GenerationResult
    from sdserve.engine.model import ModelInfo, ModelStore
    from sdserve.engine.request import EngineRequest, resolve


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sdserve.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value

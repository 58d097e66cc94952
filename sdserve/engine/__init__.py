"""The engine: request types, step-level batcher, runner, model families, decode."""

from sdserve.engine.config import EngineConfig
from sdserve.engine.engine import Engine, EngineEvent, GenerationResult
from sdserve.engine.model import ModelInfo, ModelStore
from sdserve.engine.request import EngineRequest, RequestSpec, resolve

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

"""What the servicers share: config, engine thread, admission, registry, tenants, metrics.

`begin` is the first line of every sdserve.v1 handler: refuse while draining, then find the
caller's tenant. Health and reflection do not go through it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from sdserve.adapters import TargetSpec
from sdserve.engine import Engine, ModelInfo
from sdserve.engine.loop import EngineThread
from sdserve.errors import InvalidArgument, NotFound, Unavailable
from sdserve.server.admission import Admission
from sdserve.server.auth import Authenticator
from sdserve.server.config import Config, TenantConfig
from sdserve.server.metrics import Metrics
from sdserve.server.registry import Registry
from sdserve.server.variants import VariantRouter

log = logging.getLogger("sdserve.server")

PRIORITY_HEADER = "sdserve-priority"
MAX_PRIORITY = 1000


@dataclass
class Core:
    config: Config
    engine: Engine
    engine_thread: EngineThread
    admission: Admission
    registry: Registry
    auth: Authenticator
    metrics: Metrics
    served: Mapping[str, ModelInfo]  # name -> info, default first
    default_model: str
    draining: bool = False
    jobs: dict[str, Any] = field(default_factory=dict)  # request id -> running Job
    _targets: dict[str, Mapping[str, TargetSpec]] = field(default_factory=dict)  # model -> its LoRA targets
    variants: VariantRouter = field(default_factory=lambda: VariantRouter((), ()))  # compiled variants

    def begin(self, context: grpc.aio.ServicerContext) -> TenantConfig:
        if self.draining:
            raise Unavailable("the server is shutting down; retry shortly or on another replica")
        if not self.engine_thread.alive:
            raise Unavailable("the engine stopped; the server log has details")
        return self.auth.tenant_for(context.invocation_metadata())

    def model_info(self, name: str) -> ModelInfo:
        """A served model by name ("" = the default); only configured models are reachable, so a
        request can never make the server open a directory of its choosing."""
        info = self.served.get(name or self.default_model)
        if info is None:
            raise NotFound("unknown model; ListModels names the models this server serves", field="model")
        return info

    def families(self) -> list[str]:
        return sorted({info.family for info in self.served.values()})

    def upload_models(self, family: str, model: str) -> list[ModelInfo]:
        """The served models an upload is validated against: `model` alone when named (its family
        must be `family` when that is given too), else every served model of `family`, else every
        served model. Names the header field at fault when none qualifies."""
        if model:
            info = self.served.get(model)
            if info is None:
                raise InvalidArgument(
                    f"this server serves no model {model[:64]!r}; ListModels names those it serves",
                    field="header.model",
                )
            if family and info.family != family:
                raise InvalidArgument(f"model {model[:64]!r} is {info.family}, not {family[:16]}", field="header.model")
            return [info]
        infos = [info for info in self.served.values() if not family or info.family == family]
        if not infos:
            raise InvalidArgument(
                f"this server serves no {family[:16]!r} model (families: {', '.join(self.families())})",
                field="header.family",
            )
        return infos

    def model_targets(self, model: str) -> Mapping[str, TargetSpec]:
        """The LoRA-targetable modules of served model `model` (for uploads), read once."""
        if model not in self._targets:
            # A model served only compiled: its variant's directory has the same targets.
            self._targets[model] = self.engine.lora_targets(self.variants.engine_model(model))
        return self._targets[model]


def priority_of(context: grpc.aio.ServicerContext) -> int:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == PRIORITY_HEADER:
            text = value.decode() if isinstance(value, bytes) else value
            try:
                priority = int(text)
            except ValueError:
                raise InvalidArgument("must be an integer", field=PRIORITY_HEADER) from None
            if abs(priority) > MAX_PRIORITY:
                raise InvalidArgument(f"must be between -{MAX_PRIORITY} and {MAX_PRIORITY}", field=PRIORITY_HEADER)
            return priority
    return 0

"""The Adapters service (upload, list, get, delete) and the Models service.

Uploads are checked claim by claim before anything is registered: the header (name, kind,
family or model, size, quota), the bytes as they arrive (size), their sha256, and finally the file
itself (safetensors only, every LoRA key matching a module with the right shapes; a packed
ControlNet or IP-Adapter, `sdserve.adapters.conditioning`, every tensor of the model its config
builds, and that model made for the base model's UNet) against the
served model the header names, or else against every served model of its family (every served
model if it names neither): the file is accepted if it fits at least one, and the registry keeps
the verdict for each model checked, so a request naming the adapter with a model it does not fit
is refused with the reason (generation.py). Only then does the registry name the file. A failed
upload leaves no file and no name behind. What the file is (form, rank, targets, and a Concept
Slider's trained scales and suggested start: the description `sdserve adapters inspect` gives) is
read once, after validation, and kept with its name.

The file is validated in a worker process (`upload_check`) with a time and a memory limit, so
a hostile file cannot hold this process's GIL or memory. Uploads under way are bounded per
tenant and in total; one more is refused with RESOURCE_EXHAUSTED before its bytes are read.

Tenancy: a tenant sees its own adapters and the shared ones; another tenant's adapter is
NOT_FOUND with the same message as one that does not exist.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from sdserve.adapters import conditioning, load_embedding, load_hypernetwork, load_lora
from sdserve.adapters.inspect import Listing, listing
from sdserve.api import convert
from sdserve.engine import ModelInfo
from sdserve.errors import AdapterError, InvalidArgument, ResourceExhausted
from sdserve.server import status
from sdserve.server.auth import require_admin
from sdserve.server.config import TenantConfig
from sdserve.server.core import Core
from sdserve.server.registry import SHA256, SHARED, Quota, check_name
from sdserve.server.upload_check import UploadChecks

KINDS = ("lora", "embedding", "hypernetwork", *conditioning.KINDS)
# The conditioning models travel packed (sdserve.adapters.conditioning): checked by building the
# model the pack claims to be (on the meta device) against each candidate model's UNet config.
CONDITIONING_CHECKS = {conditioning.CONTROLNET: conditioning.check_controlnet,
                       conditioning.IP_ADAPTER: conditioning.check_ip_adapter}
MAX_REASON_CHARS = 300
"""A misfit's reason as kept in the registry and told to clients (shape messages are short)."""

log = logging.getLogger("sdserve.server")


class AdaptersService:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.outcome = core.metrics.outcome
        # Created on the event loop's thread (Server.start): see UploadChecks.start.
        self.checks = UploadChecks(core.config.registry).start()
        # Uploads under way, counted on the event loop (their one owner, so no locks).
        self.uploads = 0
        self.tenant_uploads: dict[str, int] = {}

    def close(self) -> None:
        """Stop the validation workers (the server's stop calls this)."""
        self.checks.close()

    @contextmanager
    def _upload_slot(self, tenant: str) -> Iterator[None]:
        """Hold one of the tenant's and one of the server's upload places, whatever way the
        upload ends; refuse at once when either bound is reached."""
        config = self.core.config.registry
        if self.tenant_uploads.get(tenant, 0) >= config.max_tenant_concurrent_uploads:
            raise ResourceExhausted(
                f"this tenant already has {config.max_tenant_concurrent_uploads} upload(s) under way, "
                "the most it may; retry when one has finished"
            )
        if self.uploads >= config.max_concurrent_uploads:
            raise ResourceExhausted("the server is receiving as many uploads as it may at once; retry shortly")
        self.uploads += 1
        self.tenant_uploads[tenant] = self.tenant_uploads.get(tenant, 0) + 1
        try:
            yield
        finally:
            self.uploads -= 1
            left = self.tenant_uploads.pop(tenant) - 1
            if left:
                self.tenant_uploads[tenant] = left

    @status.unary_method
    async def UploadAdapter(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self.core.begin(context)
        with self._upload_slot(tenant.name):
            return await self._upload(tenant, request_iterator)

    async def _upload(self, tenant: TenantConfig, request_iterator: Any) -> Any:
        core = self.core
        chunks = request_iterator.__aiter__()
        first = await anext(chunks, None)
        header = convert.upload_part(first) if first is not None else None
        if not isinstance(header, convert.UploadHeader):
            raise InvalidArgument("the first chunk of an upload must be the header", field="header")
        check_name(header.name, "header.name")
        kind = header.kind or "lora"
        if kind not in KINDS:
            raise InvalidArgument(f"kind {kind[:32]!r} is not served; kinds: {', '.join(KINDS)}", field="header.kind")
        # INVALID_ARGUMENT naming header.model / header.family if this server serves no such model.
        candidates = core.upload_models(header.family, header.model)
        if not SHA256.match(header.sha256):
            raise InvalidArgument("must be the file's sha256 as 64 hex digits", field="header.sha256")
        if header.shared:
            require_admin(tenant, "publishing a shared adapter")
        scope = SHARED if header.shared else tenant.name
        quota = Quota(tenant.max_adapters, tenant.max_adapter_bytes_total)
        limit = core.config.registry.max_adapter_bytes
        if header.size > limit:
            raise InvalidArgument(f"the file has {header.size} bytes, more than the limit of {limit}", field="header.size")
        # Refuse an upload over quota before receiving its bytes; the registry checks again when
        # it names the file, in the same transaction.
        core.registry.check_quota(scope, header.name, max(header.size, 0), quota)

        try:
            with core.registry.staging_file() as (staged, handle):
                hasher = hashlib.sha256()
                received = 0
                async for chunk in chunks:
                    part = convert.upload_part(chunk)
                    if isinstance(part, convert.UploadHeader):
                        raise InvalidArgument("only the first chunk may be a header", field="header")
                    if not part:
                        continue
                    received += len(part)
                    if received > limit:
                        raise InvalidArgument(f"the file exceeds the limit of {limit} bytes", field="data")
                    hasher.update(part)
                    handle.write(part)
                handle.close()
                if header.size and received != header.size:
                    raise InvalidArgument(
                        f"received {received} bytes, the header declared {header.size} (truncated upload?)", field="data"
                    )
                digest = hasher.hexdigest()
                if digest != header.sha256:
                    raise InvalidArgument(
                        f"the received bytes have sha256 {digest}, not the declared one", field="header.sha256"
                    )
                checked = await self._validate(staged, header.name, kind, candidates)
                family = _family_of(checked, candidates)
                facts = await self._describe(staged, header.name, kind)
                record = await asyncio.to_thread(
                    core.registry.register, scope, header.name, kind, family, staged, digest, quota,
                    form=facts.form, rank=facts.rank, targets=facts.targets, checked=checked,
                    slider_scales=facts.slider_scales, slider_start=facts.slider_start,
                )
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The disk filled while staging or storing: nothing was kept (the staging file is
            # removed), and the caller may retry later or on another replica.
            log.error("upload of %r refused: the adapter store is out of disk space", header.name[:64])
            raise ResourceExhausted("the server's adapter store is out of disk space; retry later") from None
        core.metrics.adapter_upload_bytes.inc(record.size)
        return convert.adapter_info(record)

    async def _validate(self, staged: Any, name: str, kind: str, candidates: list[ModelInfo]) -> dict[str, str]:
        """Load the file as the engine will against each candidate model, in a validation worker
        (the loaded adapter stays there: only the verdict comes back). Returns model -> "" where it
        fits, else why not; refuses the file (field "data") when it fits none.

        Models with equal shapes (same targets, text or attention widths) share one check."""
        groups: list[tuple[tuple[Any, ...], list[str]]] = []  # (job arguments, models they stand for)
        for info in candidates:
            if kind == "lora":
                # A plain dict: the job is pickled to the worker, and the engine's mapping type
                # need not be picklable.
                job: tuple[Any, ...] = (load_lora, dict(self.core.model_targets(info.name)))
            elif kind == "embedding":
                job = (load_embedding, dict(info.text_widths))
            elif kind in CONDITIONING_CHECKS:
                # A plain dict of the model's facts; models with equal facts share one check.
                facts = conditioning.model_facts(info.name, info.family, info.backend or "eager", info.unet_config,
                                                 info.vae_scale_factor, info.unet_in_channels)
                job = (CONDITIONING_CHECKS[kind], {**facts, "name": ""})
            else:
                job = (load_hypernetwork, tuple(info.attention_widths))
            same = next((models for other, models in groups if other == job), None)
            if same is not None:
                same.append(info.name)
            else:
                groups.append((job, [info.name]))
        checked: dict[str, str] = {}
        for (load, shapes), models in groups:
            kwargs = {"max_rank": self.core.config.registry.max_rank} if kind == "lora" else {}
            try:
                await self.checks.run(load, staged, name, shapes, **kwargs)
                reason = ""
            except AdapterError as exc:
                # Only a misfit is a verdict; a timeout, memory or crash refusal ends the upload.
                reason = exc.problem[:MAX_REASON_CHARS] or "it does not fit"
            checked.update(dict.fromkeys(models, reason))
        if not any(not reason for reason in checked.values()):
            if len(checked) == 1:
                # AdapterError names the adapter; as an upload error it is about the data sent.
                ((model, reason),) = checked.items()
                raise InvalidArgument(f"adapter {name!r} does not fit model {model!r}: {reason}", field="data")
            why = "; ".join(f"{model!r}: {reason}" for model, reason in checked.items())
            raise InvalidArgument(f"adapter {name!r} fits none of the served models it was checked against ({why})",
                                  field="data")
        return checked

    async def _describe(self, staged: Any, name: str, kind: str) -> Listing:
        """What the validated file is, read in a validation worker too (the description parses the
        file again, under the same limits); the worker's report is checked on the way back."""
        describe = conditioning.listing if kind in conditioning.KINDS else listing
        facts = Listing.from_json(await self.checks.run(describe, staged, name, kind))
        if facts.targets == 0:  # every file `describe` reads touches something
            log.warning("upload of %r: its form, rank and targets could not be read; listed empty", name[:64])
        return facts

    @status.unary_method
    async def ListAdapters(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self.core.begin(context)
        records = await asyncio.to_thread(self.core.registry.list, tenant.name, request.family)
        return convert.list_adapters_response(records)

    @status.unary_method
    async def GetAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self.core.begin(context)
        check_name(request.name)
        record = await asyncio.to_thread(self.core.registry.resolve, tenant.name, request.name)
        return convert.adapter_info(record)

    @status.unary_method
    async def DeleteAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self.core.begin(context)
        check_name(request.name)
        if request.shared:
            require_admin(tenant, "deleting a shared adapter")
        scope = SHARED if request.shared else tenant.name
        record = await asyncio.to_thread(self.core.registry.delete, scope, request.name)
        return convert.delete_adapter_response(record.sha256)


def _family_of(checked: dict[str, str], candidates: list[ModelInfo]) -> str:
    """The family of the models an upload fits; refused when they span families (only possible when
    the header named neither a family nor a model)."""
    families = sorted({info.family for info in candidates if info.name in checked and not checked[info.name]})
    if len(families) > 1:
        raise InvalidArgument(f"the file fits models of several families ({', '.join(families)}); "
                              "name one in header.family or a model in header.model", field="header.family")
    return families[0]


class ModelsService:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.outcome = core.metrics.outcome

    @status.unary_method
    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.core.begin(context)
        return convert.list_models_response(list(self.core.served.values()), self.core.default_model)

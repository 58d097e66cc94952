"""The Adapters service (upload, list, get, delete) and the Models service.

Uploads are checked claim by claim before anything is registered: the header (name, kind,
family, size, quota), the bytes as they arrive (size), their sha256, and finally the file
itself against this server's model of the declared family (safetensors only, every LoRA key
matching a module with the right shapes). Only then does the registry name the file. A failed
upload leaves no file and no name behind. What the file is (form, rank, targets: the description
`sdserve adapters inspect` gives) is read once, after validation, and kept with its name.

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

from sdserve.adapters import load_embedding, load_hypernetwork, load_lora
from sdserve.adapters.inspect import Listing, listing
from sdserve.api import convert
from sdserve.errors import AdapterError, InvalidArgument, ResourceExhausted
from sdserve.server import status
from sdserve.server.auth import require_admin
from sdserve.server.config import TenantConfig
from sdserve.server.core import Core
from sdserve.server.registry import SHA256, SHARED, Quota, check_name
from sdserve.server.upload_check import UploadChecks

KINDS = ("lora", "embedding", "hypernetwork")

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
        info = core.family_model(header.family)  # INVALID_ARGUMENT if this server serves none
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
                await self._validate(staged, header.name, kind, info)
                facts = await self._describe(staged, header.name, kind)
                record = await asyncio.to_thread(
                    core.registry.register, scope, header.name, kind, header.family, staged, digest, quota,
                    form=facts.form, rank=facts.rank, targets=facts.targets,
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

    async def _validate(self, staged: Any, name: str, kind: str, info: Any) -> None:
        """Load the file as the engine will, against this server's model of its family, in a
        validation worker (the loaded adapter stays there: only the verdict comes back)."""
        try:
            if kind == "lora":
                # A plain dict: the job is pickled to the worker, and the engine's mapping type
                # need not be picklable.
                targets = dict(self.core.targets(info.family))
                await self.checks.run(load_lora, staged, name, targets, max_rank=self.core.config.registry.max_rank)
            elif kind == "embedding":
                await self.checks.run(load_embedding, staged, name, dict(info.text_widths))
            else:
                await self.checks.run(load_hypernetwork, staged, name, tuple(info.attention_widths))
        except AdapterError as exc:
            # AdapterError names the adapter; as an upload error it is about the data sent.
            raise InvalidArgument(str(exc.message), field="data") from None

    async def _describe(self, staged: Any, name: str, kind: str) -> Listing:
        """What the validated file is, read in a validation worker too (the description parses the
        file again, under the same limits); the worker's report is checked on the way back."""
        facts = Listing.from_json(await self.checks.run(listing, staged, name, kind))
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


class ModelsService:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.outcome = core.metrics.outcome

    @status.unary_method
    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.core.begin(context)
        return convert.list_models_response(list(self.core.served.values()), self.core.default_model)

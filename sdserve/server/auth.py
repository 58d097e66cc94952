"""API keys -> tenants. A call proves its tenant with `authorization: Bearer <key>` metadata.

Keys are kept only as sha256 hashes and compared in constant time. A tenant configured without
a key is the anonymous tenant: calls without an authorization header act as it. A header with
an unknown key is refused even when an anonymous tenant exists, so a typo in a key never
silently runs as someone else.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from sdserve.errors import PermissionDenied, Unauthenticated
from sdserve.server.config import TenantConfig, hash_key

AUTH_HEADER = "authorization"


class Authenticator:
    def __init__(self, tenants: Iterable[TenantConfig]) -> None:
        self._tenants = tuple(tenants)
        self._anonymous = next((t for t in self._tenants if not t.key_sha256), None)

    @property
    def tenants(self) -> tuple[TenantConfig, ...]:
        return self._tenants

    def tenant_for(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> TenantConfig:
        header = None
        for key, value in metadata or ():
            if key.lower() == AUTH_HEADER:
                header = value.decode() if isinstance(value, bytes) else value
                break
        if header is None:
            if self._anonymous is None:
                raise Unauthenticated("missing API key: send 'authorization: Bearer <key>' metadata")
            return self._anonymous
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'")
        digest = hash_key(key.strip())
        found = None
        for tenant in self._tenants:
            # Compare against every tenant so the time taken does not depend on which one matched.
            if tenant.key_sha256 and hmac.compare_digest(tenant.key_sha256, digest):
                found = tenant
        if found is None:
            raise Unauthenticated("invalid API key")
        return found


def require_admin(tenant: TenantConfig, what: str) -> None:
    if not tenant.admin:
        raise PermissionDenied(f"{what} needs an admin API key")

"""API keys: `Authorization: Bearer <key>` -> tenant. Pure; keys are never logged.

Only SHA-256 digests of the keys are kept after start-up, and error messages name an
entry by its position, never by its content.
"""

from __future__ import annotations

import hashlib

from services.gateway import errors

KEYS_ENV = "BATON_GATEWAY_KEYS"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str | None) -> dict[str, str] | None:
    """`"key1=tenant1,key2=tenant2"` -> {key: tenant}; None (auth off) when unset."""
    if text is None:
        return None
    keys: dict[str, str] = {}
    for position, entry in enumerate(text.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        key, sep, tenant = entry.partition("=")
        key, tenant = key.strip(), tenant.strip()
        if not sep or not key or not tenant:
            raise ValueError(f"{KEYS_ENV}: entry {position} is not of the form key=tenant")
        if key in keys and keys[key] != tenant:
            raise ValueError(f"{KEYS_ENV}: entry {position} repeats a key with another tenant")
        keys[key] = tenant
    if not keys:
        raise ValueError(f"{KEYS_ENV} is set but holds no key=tenant entries (unset it to turn auth off)")
    return keys


class Authenticator:
    """Checks bearer tokens against the configured keys; `None` keys means auth is off."""

    def __init__(self, api_keys: dict[str, str] | None):
        self.enabled = api_keys is not None
        self._tenants = {_digest(key): tenant for key, tenant in (api_keys or {}).items()}

    def __len__(self) -> int:
        return len(self._tenants)

    def tenant(self, authorization: str | None) -> str | None:
        """The caller's tenant (None when auth is off); raises a 401 GatewayError."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.unauthorized(missing=True)
        tenant = self._tenants.get(_digest(token))
        if tenant is None:
            raise errors.unauthorized(missing=False)
        return tenant

"""API keys: the caller behind a key, looked up by the key's SHA-256 digest.

Only digests are stored. A presented key is hashed, the digest picks the candidate entry, and
one constant-time comparison confirms it, so the work per call does not grow with the number
of keys and the comparison does not leak how many bytes matched.
"""

from __future__ import annotations

import hmac

from router.calls import Caller
from router.config import LoadedConfig, hash_api_key
from router.errors import Unauthenticated


class KeyRing:
    """``authenticate(api_key) -> Caller`` for every key of every tenant."""

    def __init__(self, loaded: LoadedConfig):
        self._callers: dict[str, tuple[bytes, Caller]] = {
            key.sha256: (
                key.sha256.encode("ascii"),
                Caller(
                    tenant_name,
                    key.name,
                    key.admin,
                    frozenset(key.apps) if key.apps is not None else None,
                ),
            )
            for tenant_name, tenant in loaded.config.tenants.items()
            for key in tenant.api_keys
        }
        self._absent = b"0" * 64

    def authenticate(self, api_key: str | None) -> Caller:
        if not api_key:
            raise Unauthenticated("missing API key (send it as x-api-key metadata)")
        presented = hash_api_key(api_key)
        stored, caller = self._callers.get(presented, (self._absent, None))
        if not hmac.compare_digest(stored, presented.encode("ascii")) or caller is None:
            raise Unauthenticated("unknown API key")
        return caller

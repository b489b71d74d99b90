"""API keys in call metadata: ``x-api-key: KEY`` or ``authorization: Bearer KEY``.

Authentication is applied to every Plexus method where its handler is registered
(``servicers.rpc``), not in a ``grpc.aio`` interceptor: an aio interceptor costs a coroutine
and a new handler object per call, which measured as most of the gap to a bare echo servicer.
Health checking and reflection stay open.
"""

from __future__ import annotations

from collections.abc import Iterable


def api_key_from_metadata(metadata: Iterable[tuple[str, str]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "x-api-key":
            return value
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
    return None

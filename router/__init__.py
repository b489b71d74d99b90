"""Plexus: an AI orchestration router with native hot paths, ONNX routing models and gRPC.

The in-process API is these names; everything else is internal::

    import asyncio
    import router

    async def main() -> None:
        plexus = router.Plexus(router.load_config("examples/retail/plexus.yaml"))
        caller = plexus.keys.authenticate("retail-demo-key")
        query = router.RouteQuery(app="storefront", text="where is my order 88123?")
        decision = await plexus.pipeline.route(caller, query)
        async for event in plexus.pipeline.orchestrate(caller, query):
            print(event)
        await plexus.aclose()

    asyncio.run(main())

Serving it over gRPC is ``PlexusServer(loaded)`` (what ``plexus serve`` runs); calling a
server is ``PlexusClient(address, api_key)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "AsyncPlexusClient",
    "Caller",
    "ConfigError",
    "ContextEvent",
    "DecisionEvent",
    "DeltaEvent",
    "ErrorEvent",
    "FinalEvent",
    "Finding",
    "LoadedConfig",
    "OrchestrateEvent",
    "Pipeline",
    "Plexus",
    "PlexusClient",
    "PlexusClientError",
    "PlexusError",
    "PlexusServer",
    "RequestState",
    "RouteDecision",
    "RouteQuery",
    "StitchResult",
    "ingest",
    "load_config",
    "parse_config",
    "train_tenant",
]

# Names resolve on first use, so `import router` stays cheap (the CLI imports it for --help).
_WHERE = {
    "Caller": "router.calls",
    "RouteDecision": "router.calls",
    "RouteQuery": "router.calls",
    "ConfigError": "router.config",
    "LoadedConfig": "router.config",
    "load_config": "router.config",
    "parse_config": "router.config",
    "PlexusError": "router.errors",
    "ContextEvent": "router.pipeline",
    "DecisionEvent": "router.pipeline",
    "DeltaEvent": "router.pipeline",
    "ErrorEvent": "router.pipeline",
    "FinalEvent": "router.pipeline",
    "Finding": "router.pipeline",
    "OrchestrateEvent": "router.pipeline",
    "Pipeline": "router.pipeline",
    "RequestState": "router.pipeline",
    "Plexus": "router.plexus",
    "PlexusClient": "router.client",
    "AsyncPlexusClient": "router.client",
    "PlexusClientError": "router.client",
    "PlexusServer": "router.server.app",
    "StitchResult": "router.context.stitch",
    "ingest": "router.context.ingest",
    "train_tenant": "router.routing.tenant_training",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'router' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from router.calls import Caller, RouteDecision, RouteQuery
    from router.client import AsyncPlexusClient, PlexusClient, PlexusClientError
    from router.config import ConfigError, LoadedConfig, load_config, parse_config
    from router.context.ingest import ingest
    from router.context.stitch import StitchResult
    from router.errors import PlexusError
    from router.pipeline import (
        ContextEvent,
        DecisionEvent,
        DeltaEvent,
        ErrorEvent,
        FinalEvent,
        Finding,
        OrchestrateEvent,
        Pipeline,
        RequestState,
    )
    from router.plexus import Plexus
    from router.routing.tenant_training import train_tenant
    from router.server.app import PlexusServer

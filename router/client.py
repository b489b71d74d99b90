"""A small gRPC client for Plexus (used by the CLI, the benchmarks and the tests)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import grpc

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc


class PlexusClient:
    def __init__(self, address: str, api_key: str, timeout: float = 10.0):
        self.channel = grpc.insecure_channel(address)
        self.router = pb_grpc.RouterStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.metadata = (("x-api-key", api_key),)
        self.timeout = timeout

    def route(
        self, app: str, text: str, metadata: Mapping[str, str] | None = None, user_tier: str = ""
    ) -> pb.RouteDecision:
        request = pb.RouteRequest(
            app=app, text=text, metadata=dict(metadata or {}), user_tier=user_tier
        )
        return self.router.Route(request, metadata=self.metadata, timeout=self.timeout)

    def stitch(
        self,
        app: str,
        text: str,
        metadata: Mapping[str, str] | None = None,
        packets: Iterable[pb.ContextPacket] = (),
        budget_tokens: int = 0,
    ) -> pb.StitchResponse:
        request = pb.StitchRequest(
            request=pb.RouteRequest(app=app, text=text, metadata=dict(metadata or {})),
            packets=list(packets),
            budget_tokens=budget_tokens,
        )
        return self.router.Stitch(request, metadata=self.metadata, timeout=self.timeout)

    def orchestrate(
        self,
        app: str,
        text: str,
        metadata: Mapping[str, str] | None = None,
        packets: Iterable[pb.ContextPacket] = (),
    ) -> Iterator[pb.OrchestrateEvent]:
        """The event stream: decision, context, deltas, then final (or error)."""
        request = pb.OrchestrateRequest(
            request=pb.RouteRequest(app=app, text=text, metadata=dict(metadata or {})),
            packets=list(packets),
        )
        return self.router.Orchestrate(request, metadata=self.metadata, timeout=self.timeout)

    def route_batch(self, app: str, texts: Iterable[str]) -> pb.RouteBatchResponse:
        request = pb.RouteBatchRequest(requests=[pb.RouteRequest(app=app, text=t) for t in texts])
        return self.router.RouteBatch(request, metadata=self.metadata, timeout=self.timeout)

    def list_models(self) -> pb.ListModelsResponse:
        return self.admin.ListModels(
            pb.ListModelsRequest(), metadata=self.metadata, timeout=self.timeout
        )

    def load_model(self, version: str = "", force: bool = False) -> pb.ModelStatus:
        return self.admin.LoadModel(
            pb.LoadModelRequest(version=version, force=force),
            metadata=self.metadata,
            timeout=max(self.timeout, 120),
        )

    def rollback(self) -> pb.ModelStatus:
        return self.admin.Rollback(
            pb.RollbackRequest(), metadata=self.metadata, timeout=max(self.timeout, 60)
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PlexusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

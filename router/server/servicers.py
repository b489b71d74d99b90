"""Thin gRPC servicers: proto -> domain, call, domain -> proto, errors -> status codes.

Requests are parsed here rather than by grpc's deserializer so that a malformed message (for
example a text field that is not valid UTF-8) is answered with INVALID_ARGUMENT, not INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from router._generated.plexus.v1 import plexus_pb2 as pb
from router.context.collections import TenantCollections
from router.context.stitch import Stitcher
from router.errors import InvalidArgument, PlexusError
from router.pipeline import Orchestrator
from router.routing.service import Caller, RouteQuery, Router, TenantRouter
from router.server.auth import api_key_from_metadata
from router.server.convert import (
    decision_to_proto,
    orchestrate_event_to_proto,
    packet_from_proto,
    query_from_proto,
    status_to_proto,
    stitch_to_proto,
)

log = logging.getLogger("plexus.server")
M = TypeVar("M", bound=Message)
T = TypeVar("T")


def parse(message_type: type[M], data: bytes) -> M:
    try:
        return message_type.FromString(data)
    except DecodeError:
        raise InvalidArgument(
            f"not a valid {message_type.DESCRIPTOR.name} (string fields must be UTF-8)"
        ) from None


async def _abort_for(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, PlexusError):
        await context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
    log.exception("unexpected error")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server logged it")


def rpc(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Wrap a unary method: deadline check, API key -> caller, domain errors -> status codes.

    Anything that is not a domain error becomes INTERNAL, logged once, never a stack trace.
    """

    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before work")
        try:
            caller = self.router.authenticate(api_key_from_metadata(context.invocation_metadata()))
            return await method(self, caller, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a trace
            await _abort_for(context, exc)
            raise  # unreachable: abort raises

    return wrapper


class RouterServicer:
    def __init__(
        self, router: Router, stitcher: Stitcher, orchestrator: Orchestrator, executor: Executor
    ):
        self.router = router
        self.stitcher = stitcher
        self.orchestrator = orchestrator
        self.batcher = stitcher.batcher
        self.executor = executor

    async def _off_loop(self, context: grpc.aio.ServicerContext, fn: Callable[[], T]) -> T:
        """Run CPU-heavy work in the bounded executor, within the call's deadline."""
        remaining = context.time_remaining()
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn)
        return await asyncio.wait_for(future, timeout=remaining)

    async def _decide(self, tenant: TenantRouter, query: RouteQuery, caller: Caller) -> Any:
        """A decision; for the accurate family the text is encoded by the micro-batcher first."""
        embedding = None
        if tenant.heavy:
            tenant.check_query(query, caller)
            embedding = (await self.batcher.encode(query.text)).reshape(1, -1)
        return tenant.decide(query, caller, embedding)

    @rpc
    async def route(self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        query = query_from_proto(parse(pb.RouteRequest, data))
        decision = await self._decide(self.router.tenant(caller), query, caller)
        return decision_to_proto(decision).SerializeToString()

    @rpc
    async def stitch(self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request = parse(pb.StitchRequest, data)
        result = await self.stitcher.stitch(
            caller,
            query_from_proto(request.request),
            [packet_from_proto(p) for p in request.packets],
            budget_tokens=request.budget_tokens or None,
            timeout=context.time_remaining(),
        )
        return stitch_to_proto(result).SerializeToString()

    @rpc
    async def route_batch(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        request = parse(pb.RouteBatchRequest, data)
        limit = self.router.loaded.config.server.max_batch
        if not request.requests:
            raise InvalidArgument("the batch is empty")
        if len(request.requests) > limit:
            raise InvalidArgument(
                f"the batch has {len(request.requests)} requests; the limit is {limit}"
            )
        queries = [query_from_proto(r) for r in request.requests]
        tenant = self.router.tenant(caller)
        decisions = await self._off_loop(context, lambda: tenant.decide_many(queries, caller))
        return pb.RouteBatchResponse(
            decisions=[decision_to_proto(d) for d in decisions]
        ).SerializeToString()

    async def route_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        try:
            caller = self.router.authenticate(api_key_from_metadata(context.invocation_metadata()))
            tenant = self.router.tenant(caller)
            async for data in requests:
                query = query_from_proto(parse(pb.RouteRequest, data))
                decision = await self._decide(tenant, query, caller)
                yield decision_to_proto(decision).SerializeToString()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort_for(context, exc)

    async def orchestrate(
        self, data: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Server-streaming: errors before the first event become a status; backend failures
        after it arrive as an error event (the design: never a broken stream)."""
        try:
            caller = self.router.authenticate(api_key_from_metadata(context.invocation_metadata()))
            request = parse(pb.OrchestrateRequest, data)
            remaining = context.time_remaining()
            events = self.orchestrator.orchestrate(
                caller,
                query_from_proto(request.request),
                [packet_from_proto(p) for p in request.packets],
                max_tokens=request.max_tokens or None,
                deadline=None if remaining is None else time.monotonic() + remaining,
            )
            async for event in events:
                yield orchestrate_event_to_proto(event).SerializeToString()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort_for(context, exc)


class AdminServicer:
    def __init__(
        self, router: Router, collections: Mapping[str, TenantCollections], executor: Executor
    ):
        self.router = router
        self.collections = collections
        self.executor = executor

    @rpc
    async def reload_collection(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        request = parse(pb.ReloadCollectionRequest, data)
        self.router.admin_tenant(caller)
        collections = self.collections[caller.tenant]
        await asyncio.get_running_loop().run_in_executor(
            self.executor, collections.reload, request.collection
        )
        collection = collections.get(request.collection)
        return pb.CollectionStatus(
            collection=collection.name,
            version=collection.version,
            size=collection.size,
            index_kind=collection.index_kind,
        ).SerializeToString()

    @rpc
    async def list_models(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        parse(pb.ListModelsRequest, data)
        tenant = self.router.admin_tenant(caller)
        infos = await asyncio.get_running_loop().run_in_executor(self.executor, tenant.list_models)
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    version=i.version,
                    family=i.family,
                    created_at=i.created_at,
                    training_data_sha256=i.training_data_sha256,
                    metrics=i.metrics,
                    active=i.active,
                )
                for i in infos
            ]
        ).SerializeToString()

    @rpc
    async def load_model(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        request = parse(pb.LoadModelRequest, data)
        tenant = self.router.admin_tenant(caller)
        status = await asyncio.get_running_loop().run_in_executor(
            self.executor, tenant.load_version, request.version or None, request.force
        )
        return status_to_proto(status).SerializeToString()

    @rpc
    async def rollback(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        parse(pb.RollbackRequest, data)
        tenant = self.router.admin_tenant(caller)
        status = await asyncio.get_running_loop().run_in_executor(self.executor, tenant.rollback)
        return status_to_proto(status).SerializeToString()


def _identity(data: bytes) -> bytes:
    return data


def generic_handlers(
    router_servicer: RouterServicer, admin_servicer: AdminServicer
) -> list[grpc.GenericRpcHandler]:
    unary = grpc.unary_unary_rpc_method_handler
    router_methods = {
        "Route": unary(router_servicer.route, _identity, _identity),
        "RouteBatch": unary(router_servicer.route_batch, _identity, _identity),
        "RouteStream": grpc.stream_stream_rpc_method_handler(
            router_servicer.route_stream, _identity, _identity
        ),
        "Stitch": unary(router_servicer.stitch, _identity, _identity),
        "Orchestrate": grpc.unary_stream_rpc_method_handler(
            router_servicer.orchestrate, _identity, _identity
        ),
    }
    admin_methods = {
        "ListModels": unary(admin_servicer.list_models, _identity, _identity),
        "LoadModel": unary(admin_servicer.load_model, _identity, _identity),
        "Rollback": unary(admin_servicer.rollback, _identity, _identity),
        "ReloadCollection": unary(admin_servicer.reload_collection, _identity, _identity),
    }
    return [
        grpc.method_handlers_generic_handler("plexus.v1.Router", router_methods),
        grpc.method_handlers_generic_handler("plexus.v1.Admin", admin_methods),
    ]

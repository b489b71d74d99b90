"""Thin gRPC servicers: proto -> domain, one pipeline call, domain -> proto.

One wrapper (``rpc``) serves every call shape: it refuses an expired deadline, resolves the API
key to a caller, and maps domain errors to status codes (anything else becomes INTERNAL, logged
once, never a stack trace). Requests are parsed here rather than by grpc's deserializer so that
a malformed message (for example a text field that is not valid UTF-8) is answered with
INVALID_ARGUMENT, not INTERNAL.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from functools import wraps
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from router._generated.plexus.v1 import plexus_pb2 as pb
from router.calls import Caller
from router.config import ConfigError
from router.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, PlexusError
from router.observe.tracing import TRACEPARENT, traceparent_from_metadata
from router.pipeline import ErrorEvent
from router.plexus import Plexus
from router.policy.limits import read_usage
from router.server.auth import api_key_from_metadata
from router.server.changes import ChangeNotices
from router.server.convert import (
    collection_status_to_proto,
    decision_to_proto,
    drift_to_proto,
    models_to_proto,
    orchestrate_event_to_proto,
    packet_from_proto,
    query_from_proto,
    status_to_proto,
    stitch_to_proto,
    usage_to_proto,
)

log = logging.getLogger("plexus.server")
M = TypeVar("M", bound=Message)


def parse(message_type: type[M], data: bytes) -> M:
    try:
        return message_type.FromString(data)
    except DecodeError:
        raise InvalidArgument(
            f"not a valid {message_type.DESCRIPTOR.name} (string fields must be UTF-8)"
        ) from None


async def _abort_for(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, PlexusError):
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:  # as HTTP's Retry-After (whole seconds), and exactly
            context.set_trailing_metadata(
                (
                    ("retry-after", str(math.ceil(retry_after))),
                    ("retry-after-ms", str(math.ceil(retry_after * 1000))),
                )
            )
        await context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
    log.exception("unexpected error")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server logged it")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on ``time.monotonic()``'s clock, or None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (unary, or an async generator for streaming responses).

    The method is called as ``method(self, caller, request, context)``. A call refused before
    its request entered the pipeline (an unknown key, a deadline already past, a malformed
    message) goes to the servicer's ``refused(caller, rpc, error)``, so that it is recorded.
    """
    name = "".join(part.title() for part in method.__name__.split("_"))  # route_batch: RouteBatch

    async def caller_of(self: Any, context: grpc.aio.ServicerContext) -> Caller:
        metadata = context.invocation_metadata()
        TRACEPARENT.set(traceparent_from_metadata(metadata))  # this call's trace, if it has one
        return self.plexus.keys.authenticate(api_key_from_metadata(metadata))

    def check_deadline(context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("deadline expired before work")

    if inspect.isasyncgenfunction(method):

        @wraps(method)
        async def streaming(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            caller = None
            try:
                caller = await caller_of(self, context)
                check_deadline(context)
                async for reply in method(self, caller, request, context):
                    yield reply
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                await self.refused(caller, name, exc)
                await _abort_for(context, exc)

        return streaming

    @wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = None
        try:
            caller = await caller_of(self, context)
            check_deadline(context)
            return await method(self, caller, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            await self.refused(caller, name, exc)
            await _abort_for(context, exc)
            raise  # unreachable: abort raises

    return unary


class RouterServicer:
    """``plexus.v1.Router``."""

    def __init__(self, plexus: Plexus):
        self.plexus = plexus
        self.pipeline = plexus.pipeline
        self.max_batch = plexus.config.max_batch

    async def refused(self, caller: Caller | None, rpc: str, error: Exception) -> None:
        """Record a call refused before the pipeline (its recorders see every request); the
        caller gets the refusal's own status even if that fails."""
        if isinstance(error, PlexusError):
            try:
                await self.pipeline.refused(caller, rpc, error)
            except Exception:  # noqa: BLE001
                log.exception("recording a refused call failed")

    @rpc
    async def route(self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        query = query_from_proto(parse(pb.RouteRequest, data))
        decision = await self.pipeline.route(caller, query)
        return decision_to_proto(decision).SerializeToString()

    @rpc
    async def route_batch(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        request = parse(pb.RouteBatchRequest, data)
        if not request.requests:
            raise InvalidArgument("the batch is empty")
        if len(request.requests) > self.max_batch:
            raise InvalidArgument(
                f"the batch has {len(request.requests)} requests; the limit is {self.max_batch}"
            )
        queries = [query_from_proto(r) for r in request.requests]
        decisions = await self.pipeline.route_many(caller, queries, deadline_of(context))
        return pb.RouteBatchResponse(
            decisions=[decision_to_proto(d) for d in decisions]
        ).SerializeToString()

    @rpc
    async def route_stream(
        self, caller: Caller, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for data in requests:
            query = query_from_proto(parse(pb.RouteRequest, data))
            decision = await self.pipeline.route(caller, query, rpc="RouteStream")
            yield decision_to_proto(decision).SerializeToString()

    @rpc
    async def stitch(self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request = parse(pb.StitchRequest, data)
        result = await self.pipeline.stitch(
            caller,
            query_from_proto(request.request),
            [packet_from_proto(p) for p in request.packets],
            budget_tokens=request.budget_tokens or None,
            deadline=deadline_of(context),
        )
        return stitch_to_proto(result).SerializeToString()

    @rpc
    async def orchestrate(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        request = parse(pb.OrchestrateRequest, data)
        events = self.pipeline.orchestrate(
            caller,
            query_from_proto(request.request),
            [packet_from_proto(p) for p in request.packets],
            max_tokens=request.max_tokens or None,
            deadline=deadline_of(context),
        )
        async for event in events:
            if isinstance(event, ErrorEvent) and event.code == "DEADLINE_EXCEEDED":
                # the caller's deadline has passed: its gRPC stack reports that as the call's
                # status, so the server says the same rather than racing it with an event
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, event.message)
            yield orchestrate_event_to_proto(event).SerializeToString()


class AdminServicer:
    """``plexus.v1.Admin``: model versions and collections (admin keys only)."""

    def __init__(self, plexus: Plexus, executor: Executor, changes: ChangeNotices | None = None):
        self.plexus = plexus
        self.executor = executor
        self.changes = changes

    async def refused(self, caller: Caller | None, rpc: str, error: Exception) -> None:
        """Admin calls are not requests: the changes they make are audited where they are made
        (``_audited``), and a call refused before that is only its status."""

    async def _announce(
        self, tenant: str, kind: str, version: str = "", collection: str = ""
    ) -> None:
        if self.changes is not None:
            await self.changes.announce(tenant, kind, version, collection)

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Admin work (loading models, opening indexes) runs in the executor, not the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @asynccontextmanager
    async def _audited(
        self, caller: Caller, rpc: str, **target: str
    ) -> AsyncIterator[dict[str, str]]:
        """Record a change the block makes (or fails to make) in the tenant's audit trail,
        durably, before the caller hears of it; the block may add to ``target``."""
        audit = self.plexus.audit
        try:
            yield target
        except Exception as exc:
            if audit is not None:
                await audit.record_admin(caller, rpc, exc, **target)
            raise
        if audit is not None:
            await audit.record_admin(caller, rpc, **target)

    @rpc
    async def reload_collection(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        request = parse(pb.ReloadCollectionRequest, data)
        audited = self._audited(caller, "ReloadCollection", collection=request.collection)
        async with audited as target:
            self.plexus.deciders.admin_tenant(caller)
            collections = self.plexus.collections[caller.tenant]
            await self._off_loop(collections.reload, request.collection)
            collection = collections.get(request.collection)
            target["collection_version"] = collection.version
        await self._announce(caller.tenant, "collection", collection=request.collection)
        return collection_status_to_proto(collection).SerializeToString()

    @rpc
    async def reload_config(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        parse(pb.ReloadConfigRequest, data)
        async with self._audited(caller, "ReloadConfig"):
            self.plexus.deciders.admin_tenant(caller)
            try:
                await self._off_loop(self.plexus.reload_rules, caller.tenant)
            except ConfigError as exc:
                raise FailedPrecondition(f"the configuration was refused: {exc}") from None
        await self._announce(caller.tenant, "rules")
        return pb.ReloadConfigResponse(
            tenant=caller.tenant, message="governance and policy rules reloaded"
        ).SerializeToString()

    @rpc
    async def get_usage(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        request = parse(pb.GetUsageRequest, data)
        self.plexus.deciders.admin_tenant(caller)
        rows = await read_usage(self.plexus.limits, caller.tenant, request.user or None)
        return usage_to_proto(caller.tenant, rows).SerializeToString()

    @rpc
    async def get_drift(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        parse(pb.GetDriftRequest, data)
        self.plexus.deciders.admin_tenant(caller)
        readings = await self._off_loop(self.plexus.drift.snapshot, caller.tenant)
        return pb.GetDriftResponse(
            tenant=caller.tenant, models=[drift_to_proto(r) for r in readings]
        ).SerializeToString()

    @rpc
    async def list_models(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        parse(pb.ListModelsRequest, data)
        tenant = self.plexus.deciders.admin_tenant(caller)
        return models_to_proto(await self._off_loop(tenant.list_models)).SerializeToString()

    @rpc
    async def load_model(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        request = parse(pb.LoadModelRequest, data)
        asked = request.version or "(newest)"
        async with self._audited(caller, "LoadModel", version=asked) as target:
            tenant = self.plexus.deciders.admin_tenant(caller)
            status = await self._off_loop(
                tenant.load_version, request.version or None, request.force
            )
            target["active_version"] = status.active_version
        await self._announce(caller.tenant, "model", status.active_version)
        return status_to_proto(status).SerializeToString()

    @rpc
    async def rollback(
        self, caller: Caller, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        parse(pb.RollbackRequest, data)
        async with self._audited(caller, "Rollback") as target:
            tenant = self.plexus.deciders.admin_tenant(caller)
            status = await self._off_loop(tenant.rollback)
            target["active_version"] = status.active_version
        await self._announce(caller.tenant, "model", status.active_version)
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
        "ReloadConfig": unary(admin_servicer.reload_config, _identity, _identity),
        "GetUsage": unary(admin_servicer.get_usage, _identity, _identity),
        "GetDrift": unary(admin_servicer.get_drift, _identity, _identity),
    }
    return [
        grpc.method_handlers_generic_handler("plexus.v1.Router", router_methods),
        grpc.method_handlers_generic_handler("plexus.v1.Admin", admin_methods),
    ]

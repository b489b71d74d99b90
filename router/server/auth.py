"""API-key authentication as a server interceptor.

The key travels in the call metadata (``x-api-key: KEY`` or ``authorization: Bearer KEY``).
The interceptor resolves it to a ``Caller`` (tenant, admin, allowed apps) before the handler
runs, rejects unknown keys with UNAUTHENTICATED, and hands the caller to the handler through a
context variable. Health checking and reflection stay open.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from router.errors import PlexusError
from router.routing.service import Caller, Router

CURRENT_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("plexus_caller")
OPEN_SERVICES = ("/grpc.health.v1.", "/grpc.reflection.")


def api_key_from_metadata(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "x-api-key":
            return value
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
    return None


def _abort_handler(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


def _with_caller(handler: grpc.RpcMethodHandler, caller: Caller) -> grpc.RpcMethodHandler:
    """The same handler, running with ``CURRENT_CALLER`` set."""
    if handler.unary_unary is not None:
        inner: Callable[..., Awaitable[Any]] = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            CURRENT_CALLER.set(caller)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream is not None:
        streaming = handler.stream_stream

        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            CURRENT_CALLER.set(caller)
            async for response in streaming(requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    raise TypeError("only unary-unary and stream-stream methods are served")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, router: Router):
        self.router = router

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        try:
            caller = self.router.authenticate(api_key_from_metadata(details.invocation_metadata))
        except PlexusError as exc:
            return _abort_handler(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        return _with_caller(handler, caller)

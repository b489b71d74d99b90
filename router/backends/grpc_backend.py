"""A backend calling the Generator service (protos/plexus/v1/generator.proto) over grpc.aio.

The Generator service is the small streaming contract anyone can implement to put their own
model behind Plexus: it streams ``delta`` events and ends with one ``done`` carrying usage. Each
event may take at most ``MAX_MESSAGE_BYTES`` and the whole answer ``response_limit`` bytes (see
:mod:`router.backends.common`); a Generator that sends more fails the call, without a retry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from router._generated.plexus.v1 import generator_pb2 as pb
from router._generated.plexus.v1 import generator_pb2_grpc as pb_grpc
from router.backends.common import (
    MAX_MESSAGE_BYTES,
    backend_error,
    call_end,
    output_limit,
    oversized,
    response_limit,
    timed_out,
)
from router.backends.slots import PrioritySlots
from router.backends.types import (
    BackendError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenDelta,
    Usage,
)
from router.config import BackendConfig

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# How grpc reports, as RESOURCE_EXHAUSTED, a message over the channel's receive limit (ours, so
# not a server asking us to back off): a failure of this backend, not worth retrying.
_TOO_LARGE = "larger than max"
_FRAME_BYTES = 5  # each message's gRPC length prefix, counted with it


class GrpcBackend:
    """A backend of kind ``grpc``: one channel to ``config.url`` (HOST:PORT), opened lazily."""

    def __init__(self, name: str, config: BackendConfig):
        if config.kind != "grpc":
            raise ValueError(f"backend {name!r}: GrpcBackend needs kind 'grpc'")
        self.name = name
        self.config = config
        self._slots = PrioritySlots(config.max_concurrency)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GeneratorStub | None = None

    def _generator(self) -> pb_grpc.GeneratorStub:
        # Opened on first use so that the channel belongs to the loop that serves the calls.
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.config.url, options=_CHANNEL_OPTIONS)
            self._stub = pb_grpc.GeneratorStub(self._channel)
        return self._stub

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        end = call_end(self.name, request, self.config.timeout_seconds)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + (end - time.monotonic())):
                await self._slots.acquire(request.priority)
        except TimeoutError:
            raise timed_out(self.name, request, self.config.timeout_seconds) from None
        try:
            max_tokens = output_limit(request.max_tokens, self.config.max_output_tokens)
            message = pb.GenerateRequest(
                messages=[pb.ChatMessage(role=m.role, content=m.content) for m in request.messages],
                max_tokens=max_tokens,
                temperature=request.temperature,
                model=self.config.model,
                request_id=request.request_id,
            )
            call = self._generator().Generate(
                message,
                timeout=max(end - time.monotonic(), 0.001),
                metadata=(("traceparent", request.traceparent),) if request.traceparent else None,
            )
            try:
                limit = response_limit(max_tokens)
                received = 0  # bytes of the answer
                finished: Finished | None = None
                while True:
                    event = await call.read()
                    if event is grpc.aio.EOF:
                        break
                    assert isinstance(event, pb.GenerateEvent)
                    received += event.ByteSize() + _FRAME_BYTES
                    if received > limit:
                        raise oversized(self.name, f"a response larger than {limit} bytes")
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        if event.delta:
                            yield TokenDelta(event.delta)
                    elif kind == "done":
                        done = event.done
                        finished = Finished(
                            done.finish_reason or "stop",
                            Usage(done.prompt_tokens, done.completion_tokens),
                        )
                        break
                if finished is None:
                    raise backend_error(self.name, "stream ended early: no done event")
                yield finished
            except grpc.aio.AioRpcError as exc:
                raise self._rpc_error(exc, request) from None
            finally:
                call.cancel()  # a no-op once the call has ended
        finally:
            self._slots.release()

    def _rpc_error(self, exc: grpc.aio.AioRpcError, request: GenerationRequest) -> BackendError:
        code = exc.code()
        details = exc.details() or "no details"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return timed_out(self.name, request, self.config.timeout_seconds)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in details:
            return oversized(self.name, f"a message larger than {MAX_MESSAGE_BYTES} bytes")
        return backend_error(
            self.name, f"{code.name}: {details}", retryable=code in RETRYABLE_CODES
        )

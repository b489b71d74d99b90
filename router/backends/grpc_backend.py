"""A backend calling the Generator service (protos/plexus/v1/generator.proto) over grpc.aio.

The Generator service is the small streaming contract anyone can implement to put their own
model behind Plexus: it streams ``delta`` events and ends with one ``done`` carrying usage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from router._generated.plexus.v1 import generator_pb2 as pb
from router._generated.plexus.v1 import generator_pb2_grpc as pb_grpc
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


class GrpcBackend:
    """A backend of kind ``grpc``: one channel to ``config.url`` (HOST:PORT), opened lazily."""

    def __init__(self, name: str, config: BackendConfig):
        if config.kind != "grpc":
            raise ValueError(f"backend {name!r}: GrpcBackend needs kind 'grpc'")
        self.name = name
        self.config = config
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GeneratorStub | None = None

    def _generator(self) -> pb_grpc.GeneratorStub:
        # Opened on first use so that the channel belongs to the loop that serves the calls.
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.config.url)
            self._stub = pb_grpc.GeneratorStub(self._channel)
        return self._stub

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        now = time.monotonic()
        end = now + self.config.timeout_seconds
        if request.deadline is not None:
            if request.deadline <= now:
                raise self._error("the request deadline has already passed", retryable=False)
            end = min(end, request.deadline)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + (end - now)):
                await self._semaphore.acquire()
        except TimeoutError:
            raise self._timed_out(request) from None
        try:
            message = pb.GenerateRequest(
                messages=[pb.ChatMessage(role=m.role, content=m.content) for m in request.messages],
                max_tokens=min(request.max_tokens, self.config.max_output_tokens)
                if request.max_tokens > 0
                else self.config.max_output_tokens,
                temperature=request.temperature,
                model=self.config.model,
                request_id=request.request_id,
            )
            call = self._generator().Generate(message, timeout=max(end - time.monotonic(), 0.001))
            try:
                finished: Finished | None = None
                while True:
                    event = await call.read()
                    if event is grpc.aio.EOF:
                        break
                    assert isinstance(event, pb.GenerateEvent)
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
                    raise self._error("stream ended early: no done event", retryable=False)
                yield finished
            except grpc.aio.AioRpcError as exc:
                raise self._rpc_error(exc, request) from None
            finally:
                call.cancel()  # a no-op once the call has ended
        finally:
            self._semaphore.release()

    def _rpc_error(self, exc: grpc.aio.AioRpcError, request: GenerationRequest) -> BackendError:
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._timed_out(request)
        return self._error(
            f"{code.name}: {exc.details() or 'no details'}", retryable=code in RETRYABLE_CODES
        )

    def _timed_out(self, request: GenerationRequest) -> BackendError:
        past = request.deadline is not None and time.monotonic() >= request.deadline
        limit = (
            "the request deadline" if past else f"timeout_seconds={self.config.timeout_seconds:g}"
        )
        return self._error(f"timed out ({limit})", retryable=not past)

    def _error(self, message: str, *, retryable: bool) -> BackendError:
        return BackendError(f"{self.name}: {message}", backend=self.name, retryable=retryable)

"""The targets a client process drives, behind one adapter shape.

An adapter is an async context manager, ``ADAPTERS[job.adapter](job, routes)``, that opens
what one client process shares (a gRPC channel, or nothing) and yields a factory of streams.
Every in-flight stream of the client process is one :class:`Stream`; for payload ``index`` it
answers

    ``await stream.run(index) -> (started, first, final, error, detail)``

``started`` / ``first`` / ``final`` are ``time.perf_counter_ns()`` at send, at the first
streamed piece (0 if none, e.g. a unary reply) and at the end of the reply; ``error`` is None
on success, else a short name counted per run (a gRPC status, "error event 3", "HTTP 500", an
exception type) with ``detail`` a message. A stream records the route of each payload index it
sees first into ``routes`` (the same dict for the whole client process).

- ``route``: unary ``/plexus.v1.Router/Route`` (Plexus and the echo servicer alike);
- ``orchestrate``: server-streaming ``/plexus.v1.Router/Orchestrate``, each stream read to its
  end, events told apart by their first byte;
- ``direct``: the backend itself over HTTP/1.1, one keep-alive connection per stream, the
  chunked server-sent-event body read to its end;
- ``chat``: any OpenAI-compatible chat-completions server (Plexus's front door, a peer proxy)
  over HTTP/1.1, one keep-alive connection per stream; a streamed reply (chunked or not) must
  hold a content event and end in ``data: [DONE]``, a whole one must be a completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from bench.api import pb

if TYPE_CHECKING:
    from bench.harness.clients import Job

Outcome = tuple[int, int, int, str | None, str]
ROUTE = "/plexus.v1.Router/Route"
ORCHESTRATE = "/plexus.v1.Router/Orchestrate"
CALL_TIMEOUT_S = 30.0

# OrchestrateEvent's oneof by the first byte of its encoding (field number << 3 | 2); the
# context event (0x12) needs no handling here.
TAG_DECISION, TAG_DELTA, TAG_FINAL, TAG_ERROR = 0x0A, 0x1A, 0x22, 0x2A


class Stream(Protocol):
    async def run(self, index: int) -> Outcome: ...

    async def close(self) -> None: ...


StreamFactory = Callable[[], Stream]
Adapter = Callable[["Job", dict[int, str]], AbstractAsyncContextManager[StreamFactory]]


def _rpc_error(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name, exc.details() or ""
    return type(exc).__name__, str(exc)


class RouteStream:
    """Unary Route calls on the client process's channel, bytes in and bytes out."""

    def __init__(self, call: Any, job: Job, routes: dict[int, str]):
        self.call, self.payloads, self.routes = call, job.payloads, routes
        self.metadata = (("x-api-key", job.api_key),)

    async def close(self) -> None:
        return None

    async def run(self, index: int) -> Outcome:
        started = time.perf_counter_ns()
        try:
            reply = await self.call(
                self.payloads[index], metadata=self.metadata, timeout=CALL_TIMEOUT_S
            )
        except Exception as exc:  # noqa: BLE001 - counted and reported
            return (started, 0, 0, *_rpc_error(exc))
        final = time.perf_counter_ns()
        if index not in self.routes:
            self.routes[index] = pb.RouteDecision.FromString(reply).route
        return started, 0, final, None, ""


class OrchestrateStream(RouteStream):
    """Orchestrate calls: latency to the final event, first = the first delta event."""

    async def run(self, index: int) -> Outcome:
        first = final = 0
        error: str | None = None
        detail = ""
        started = time.perf_counter_ns()
        try:
            stream = self.call(self.payloads[index], metadata=self.metadata, timeout=CALL_TIMEOUT_S)
            async for message in stream:
                tag = message[0] if message else 0
                if tag == TAG_DELTA:
                    if not first:
                        first = time.perf_counter_ns()
                elif tag == TAG_FINAL:
                    final = time.perf_counter_ns()
                elif tag == TAG_DECISION:
                    if index not in self.routes:
                        event = pb.OrchestrateEvent.FromString(message)
                        self.routes[index] = event.decision.route
                elif tag == TAG_ERROR:
                    event = pb.OrchestrateEvent.FromString(message)
                    error, detail = f"error event {event.error.code}", event.error.message
        except Exception as exc:  # noqa: BLE001 - counted and reported
            error, detail = _rpc_error(exc)
        if error is None and not final:
            error = "no final event"
        return started, first, final, error, detail


class DirectStream:
    """Streamed chat completions straight to the backend on one keep-alive connection."""

    def __init__(self, job: Job):
        self.job = job
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def run(self, index: int) -> Outcome:
        first = final = 0
        started = time.perf_counter_ns()
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(
                        self.job.host, self.job.port
                    )
                    started = time.perf_counter_ns()  # the connection is not the baseline's
                reader, writer = self.reader, self.writer
                assert reader is not None
                writer.write(self.job.payloads[index])
                head = await reader.readuntil(b"\r\n\r\n")
                status = head[9:12]
                if status != b"200" or b"chunked" not in head.lower():
                    await self.close()
                    return started, 0, 0, f"HTTP {status.decode('latin-1')}", head[:200].decode()
                done = False
                while True:
                    line = await reader.readuntil(b"\r\n")
                    size = int(line.split(b";", 1)[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")  # no trailers: the final CRLF
                        break
                    data = await reader.readexactly(size + 2)
                    if not first and b'"content"' in data:
                        first = time.perf_counter_ns()
                    if b"[DONE]" in data:
                        done = True
                final = time.perf_counter_ns()
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
            await self.close()
            return started, 0, 0, type(exc).__name__, str(exc)
        if not done:
            return started, first, final, "no [DONE]", ""
        return started, first, final, None, ""


@contextlib.asynccontextmanager
async def _channel(job: Job, method: str, unary: bool) -> AsyncIterator[Any]:
    channel = grpc.aio.insecure_channel(f"{job.host}:{job.port}")
    try:
        # bytes in, bytes out: no client-side (de)serializing
        call = channel.unary_unary(method) if unary else channel.unary_stream(method)
        await asyncio.wait_for(channel.channel_ready(), timeout=CALL_TIMEOUT_S)
        yield call
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def route(job: Job, routes: dict[int, str]) -> AsyncIterator[StreamFactory]:
    async with _channel(job, ROUTE, unary=True) as call:
        yield lambda: RouteStream(call, job, routes)


@contextlib.asynccontextmanager
async def orchestrate(job: Job, routes: dict[int, str]) -> AsyncIterator[StreamFactory]:
    async with _channel(job, ORCHESTRATE, unary=False) as call:
        yield lambda: OrchestrateStream(call, job, routes)


@contextlib.asynccontextmanager
async def direct(job: Job, routes: dict[int, str]) -> AsyncIterator[StreamFactory]:
    yield lambda: DirectStream(job)


# A streamed event whose delta carries some text (the role-only first event does not count).
_CONTENT_EVENT = re.compile(rb'"content":\s*"(?!")')


class ChatStream:
    """Chat completions to an OpenAI-compatible server on one keep-alive connection.

    The payloads are whole HTTP/1.1 requests (:func:`chat_request`). A reply framed by
    ``Content-Length`` or by chunked transfer encoding is read to its end; ``first`` is the
    first piece of the body holding a content event (streamed replies) and :attr:`last` keeps
    what the last successful reply held: ``status``, ``headers``, ``body_bytes``, ``pieces``
    (HTTP chunks, or 1), ``content_events`` and ``body``.
    """

    def __init__(self, job: Job, routes: dict[int, str]):
        self.job, self.routes = job, routes
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last: dict[str, Any] = {}

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def _body(self, head: dict[str, str]) -> tuple[list[bytes], list[int]]:
        """The body's pieces and the time each arrived."""
        reader = self.reader
        assert reader is not None
        pieces, times = [], []
        if "chunked" in head.get("transfer-encoding", "").lower():
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers, then the final CRLF
                    return pieces, times
                pieces.append((await reader.readexactly(size + 2))[:-2])
                times.append(time.perf_counter_ns())
        length = head.get("content-length")
        if length is None:  # the body runs to the end of the connection
            pieces.append(await reader.read())
            head["connection"] = "close"
        else:
            pieces.append(await reader.readexactly(int(length)))
        times.append(time.perf_counter_ns())
        return pieces, times

    async def run(self, index: int) -> Outcome:
        first = 0
        started = time.perf_counter_ns()
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(
                        self.job.host, self.job.port
                    )
                    started = time.perf_counter_ns()  # connecting is not part of a call
                assert self.reader is not None
                self.writer.write(self.job.payloads[index])
                lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                status = lines[0][9:12]
                head = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        head[name.strip().lower()] = value.strip()
                pieces, times = await self._body(head)
                final = time.perf_counter_ns()
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
            await self.close()
            return started, 0, 0, type(exc).__name__, str(exc)
        if head.get("connection", "").lower() == "close":
            await self.close()
        body = b"".join(pieces)
        if status != "200":
            return started, 0, 0, f"HTTP {status}", body[:200].decode("utf-8", "replace")
        if "x-plexus-route" in head and index not in self.routes:
            self.routes[index] = head["x-plexus-route"]
        events = 0
        if "text/event-stream" in head.get("content-type", ""):
            for piece, at in zip(pieces, times, strict=True):
                found = len(_CONTENT_EVENT.findall(piece))
                if found and not first:
                    first = at
                events += found
            if b"data: [DONE]" not in body[-64:]:
                return started, first, final, "no [DONE]", body[-200:].decode("utf-8", "replace")
            at = body.find(b'data: {"error"')
            if at >= 0:
                return started, 0, 0, "error event", body[at : at + 200].decode("utf-8", "replace")
            if not events:
                return started, 0, 0, "no content", body[:200].decode("utf-8", "replace")
        elif b'"choices"' not in body:
            return started, 0, 0, "not a completion", body[:200].decode("utf-8", "replace")
        self.last = {
            "status": int(status),
            "headers": head,
            "body_bytes": len(body),
            "pieces": len(pieces),
            "content_events": events,
            "body": body,
        }
        return started, first, final, None, ""


@contextlib.asynccontextmanager
async def chat(job: Job, routes: dict[int, str]) -> AsyncIterator[StreamFactory]:
    yield lambda: ChatStream(job, routes)


ADAPTERS: dict[str, Adapter] = {
    "route": route,
    "orchestrate": orchestrate,
    "direct": direct,
    "chat": chat,
}


# ----------------------------------------------------------------------------- payloads


def route_payload(app: str, text: str, metadata: dict[str, str]) -> bytes:
    return pb.RouteRequest(app=app, text=text, metadata=metadata).SerializeToString()


def orchestrate_payload(app: str, text: str, metadata: dict[str, str]) -> bytes:
    request = pb.RouteRequest(app=app, text=text, metadata=metadata)
    return pb.OrchestrateRequest(request=request).SerializeToString()


def chat_post(port: int, body: bytes) -> bytes:
    """An HTTP/1.1 chat-completions request carrying ``body`` (as Plexus sent it)."""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n"
        b"Accept: application/json, text/event-stream\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (port, len(body))
    ) + body


def chat_request(port: int, body: bytes, api_key: str | None = None) -> bytes:
    """A whole HTTP/1.1 chat-completions request for ``body``, with a bearer token when given."""
    auth = b"Authorization: Bearer %s\r\n" % api_key.encode() if api_key else b""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n"
        b"Accept: application/json, text/event-stream\r\n"
        b"Content-Type: application/json\r\n"
        b"%s"
        b"Content-Length: %d\r\n\r\n" % (port, auth, len(body))
    ) + body

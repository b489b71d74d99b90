"""A real HTTP/1.1 server speaking OpenAI's chat-completions protocol, for tests.

It listens on 127.0.0.1 (an ephemeral port) and runs on its own event loop in a background
thread, like a model server in another process. It answers streaming (server-sent events over
chunked transfer) and non-streaming calls with usage, keeps connections alive, and can be told
to misbehave: set ``peer.behaviour`` (the default for every request) or ``peer.script(...)``
behaviours consumed one per request. It records what it received and how many connections are
open, so tests can check that a client neither leaks connections nor exceeds its concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any


@dataclass(frozen=True)
class Behaviour:
    """How the peer answers one request."""

    text: str = "Hello from the peer, one word at a time."
    status: int = 200  # anything else: a JSON error body with this status
    retry_after: str | None = None  # Retry-After header on an error answer
    first_byte_delay: float = 0.0  # seconds before the status line
    chunk_delay: float = 0.0  # seconds between stream events
    reset_after_chunks: int | None = None  # reset the connection after this many stream events
    malformed_json: bool = False  # a stream event whose JSON is cut off, before any content
    malformed_sse: bool = False  # a line that is not "data: ...", before any content
    end_early: bool = False  # end the body cleanly with no finish_reason, usage or [DONE]
    usage: bool = True  # report usage (in the last stream event when asked for)

    def words(self) -> list[str]:
        return self.text.split()


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    arrived: float  # time.monotonic() when the request was read


def prompt_tokens(body: Any) -> int:
    """The peer's usage count for a request: whitespace words of all its messages."""
    return sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))


class _ClientGone(Exception):
    pass


class OpenAIPeer:
    """An OpenAI-compatible server on 127.0.0.1; ``url`` is its base URL ending in /v1."""

    def __init__(self, behaviour: Behaviour | None = None):
        self.behaviour = behaviour or Behaviour()
        self.requests: list[Received] = []
        self.open_connections = 0
        self.active = 0  # requests being answered now
        self.max_active = 0
        self._script: deque[Behaviour] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server = self._call(self._start())
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def script(self, *behaviours: Behaviour) -> None:
        """Answer the next requests with these behaviours, one each, then with ``behaviour``."""
        self._loop.call_soon_threadsafe(self._script.extend, behaviours)

    async def wait_connections_closed(self, timeout: float = 2.0) -> int:
        """Wait (from any loop) until no connection is open; return how many still are."""
        end = time.monotonic() + timeout
        while self.open_connections and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return self.open_connections

    async def wait_requests(self, count: int, timeout: float = 2.0) -> None:
        end = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < end:
            await asyncio.sleep(0.005)

    def close(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    # -- server ------------------------------------------------------------------------------

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def _stop(self) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # each connection's task then ends on its own
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.open_connections += 1
        try:
            while True:
                received = await self._read_request(reader)
                if received is None:
                    break
                behaviour = self._script.popleft() if self._script else self.behaviour
                self.requests.append(received)
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                try:
                    await self._answer(received, behaviour, reader, writer)
                finally:
                    self.active -= 1
        except (_ClientGone, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> Received | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # the client closed the connection between requests
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw
        return Received(method, path, headers, body, time.monotonic())

    async def _pause(self, reader: asyncio.StreamReader, seconds: float) -> None:
        """Sleep, but notice a client that hangs up meanwhile."""
        try:
            await asyncio.wait_for(reader.read(1), seconds)
        except TimeoutError:
            return
        raise _ClientGone

    async def _answer(
        self,
        received: Received,
        behaviour: Behaviour,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if behaviour.first_byte_delay:
            await self._pause(reader, behaviour.first_byte_delay)
        body = received.body if isinstance(received.body, dict) else {}
        if received.path != "/v1/chat/completions" or received.method != "POST":
            await self._json(writer, 404, {"error": {"message": f"no route {received.path}"}})
        elif behaviour.status != 200:
            error = {"message": f"peer told to answer {behaviour.status}", "type": "peer_error"}
            extra = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else {}
            await self._json(writer, behaviour.status, {"error": error}, extra)
        elif body.get("stream"):
            await self._stream(body, behaviour, reader, writer)
        else:
            await self._json(writer, 200, self._completion(body, behaviour))

    def _usage(self, body: Any, behaviour: Behaviour) -> dict[str, int]:
        prompt = prompt_tokens(body)
        completion = len(behaviour.words())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _completion(self, body: Any, behaviour: Behaviour) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "id": "chatcmpl-peer",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "peer"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": behaviour.text},
                    "finish_reason": "stop",
                }
            ],
        }
        if behaviour.usage:
            answer["usage"] = self._usage(body, behaviour)
        return answer

    def _events(self, body: Any, behaviour: Behaviour) -> list[bytes]:
        """The stream, one SSE event per chunk of the chunked body."""

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-peer",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body.get("model", "peer"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        events: list[Any] = [chunk({"role": "assistant", "content": ""})]
        if behaviour.malformed_json:
            events.append(b'data: {"choices": [{"delta": {"content": "cut of\n\n')
        if behaviour.malformed_sse:
            events.append(b"this line is not server-sent events\n\n")
        words = behaviour.words()
        events += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
        if not behaviour.end_early:
            events.append(chunk({}, "stop"))
            wants_usage = (body.get("stream_options") or {}).get("include_usage")
            if wants_usage and behaviour.usage:
                events.append({**chunk({}), "choices": [], "usage": self._usage(body, behaviour)})
            events.append("[DONE]")
        encoded = []
        for event in events:
            if isinstance(event, bytes):
                encoded.append(event)
            else:
                payload = event if isinstance(event, str) else json.dumps(event)
                encoded.append(f"data: {payload}\n\n".encode())
        return encoded

    async def _stream(
        self,
        body: Any,
        behaviour: Behaviour,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        for i, event in enumerate(self._events(body, behaviour)):
            if i == behaviour.reset_after_chunks:
                await self._reset(writer)
            if i and behaviour.chunk_delay:
                await self._pause(reader, behaviour.chunk_delay)
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        if behaviour.reset_after_chunks is not None:
            await self._reset(writer)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _reset(self, writer: asyncio.StreamWriter) -> None:
        """Abort the connection with a TCP reset, once what was written has been delivered."""
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        raise _ClientGone

    async def _json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(payload).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        head.append(f"Content-Length: {len(data)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()

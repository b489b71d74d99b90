"""A real HTTP/1.1 server speaking OpenAI's chat-completions protocol, for tests.

It listens on 127.0.0.1 (an ephemeral port) and runs on its own event loop in a background
thread, like a model server in another process. It answers streaming (server-sent events over
chunked transfer) and non-streaming calls with usage, keeps connections alive, and can be told
to misbehave: set ``peer.behaviour`` (the default for every request) or ``peer.script(...)``
behaviours consumed one per request. It records what it received, how many bytes of each answer
it sent, how many answers the client cut off, and how many connections are open, so tests can
check that a client neither leaks connections nor exceeds its concurrency, and that it stops
reading a misbehaving stream early. Streams are generated as they are sent, so a huge or
endless one costs the peer no memory.
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
from collections.abc import Iterator
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
    repeat: int = 1  # stream the text's words this many times over (ignoring max_tokens)
    # Oversized stream parts, each sent before any content unless said otherwise:
    unterminated_line: int = 0  # a "data: xxx..." line of this many bytes with no line end yet
    event_lines: int = 0  # one event of this many 64 KiB "data:" lines
    padding: int = 0  # about this many bytes of SSE comment lines (legal, and no content)
    big_delta: int = 0  # one content delta of this many characters (big_delta_char)...
    big_delta_after: int = 0  # ...sent after this many words
    big_delta_char: str = "y"
    body_padding: int = 0  # this many bytes of JSON whitespace after a JSON answer's object

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


_PIECE = 64 * 1024  # how much of an oversized part is written at a time


class OpenAIPeer:
    """An OpenAI-compatible server on 127.0.0.1; ``url`` is its base URL ending in /v1."""

    def __init__(self, behaviour: Behaviour | None = None):
        self.behaviour = behaviour or Behaviour()
        self.requests: list[Received] = []
        self.sent: list[int] = []  # bytes of each answer written so far, one per request
        self.hangups = 0  # answers the client cut off (closed or reset) before their end
        self.open_connections = 0
        self.active = 0  # requests being answered now
        self.max_active = 0
        self._script: deque[Behaviour] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._answering: dict[asyncio.StreamWriter, int] = {}  # the request each one answers
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

    async def wait_hangups(self, count: int, timeout: float = 5.0) -> int:
        """Wait (from any loop) until the client has cut off ``count`` answers; return how many
        it has."""
        end = time.monotonic() + timeout
        while self.hangups < count and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return self.hangups

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
                self._answering[writer] = len(self.sent)
                self.sent.append(0)
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
            self._answering.pop(writer, None)
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
        self.hangups += 1
        raise _ClientGone

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write and wait until the data is on its way; a client gone meanwhile is a hang-up."""
        writer.write(data)
        try:
            await writer.drain()
        except ConnectionError:
            self.hangups += 1
            raise _ClientGone from None
        self.sent[self._answering[writer]] += len(data)

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
            await self._json(
                writer, behaviour.status, {"error": error}, extra, behaviour.body_padding
            )
        elif body.get("stream"):
            await self._stream(body, behaviour, reader, writer)
        else:
            completion = self._completion(body, behaviour)
            await self._json(writer, 200, completion, padding=behaviour.body_padding)

    def _usage(self, body: Any, behaviour: Behaviour) -> dict[str, int]:
        prompt = prompt_tokens(body)
        completion = len(behaviour.words()) * behaviour.repeat
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

    def _events(self, body: Any, behaviour: Behaviour) -> Iterator[bytes]:
        """The stream, one SSE event (or one piece of an oversized part) per chunk of the body."""

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-peer",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body.get("model", "peer"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        def event(payload: Any) -> bytes:
            text = payload if isinstance(payload, str) else json.dumps(payload)
            return f"data: {text}\n\n".encode()

        yield event(chunk({"role": "assistant", "content": ""}))
        if behaviour.malformed_json:
            yield b'data: {"choices": [{"delta": {"content": "cut of\n\n'
        if behaviour.malformed_sse:
            yield b"this line is not server-sent events\n\n"
        if behaviour.unterminated_line:
            yield b"data: "
            yield from _pieces(b"x", behaviour.unterminated_line)
            yield b"\n\n"
        if behaviour.event_lines:
            line = b"data: " + b"x" * (_PIECE - 7) + b"\n"
            for _ in range(behaviour.event_lines):
                yield line
            yield b"\n"
        if behaviour.padding:
            comment = b": " + b"." * 1021 + b"\n"  # 1 KiB a line
            for _ in range(max(behaviour.padding // _PIECE, 1)):
                yield comment * (_PIECE // len(comment))
        words = behaviour.words()
        for round_ in range(behaviour.repeat):
            for i, word in enumerate(words):
                if behaviour.big_delta and round_ == 0 and i == behaviour.big_delta_after:
                    yield event(chunk({"content": behaviour.big_delta_char * behaviour.big_delta}))
                yield event(chunk({"content": word if i == 0 and round_ == 0 else " " + word}))
        if not behaviour.end_early:
            yield event(chunk({}, "stop"))
            wants_usage = (body.get("stream_options") or {}).get("include_usage")
            if wants_usage and behaviour.usage:
                yield event({**chunk({}), "choices": [], "usage": self._usage(body, behaviour)})
            yield event("[DONE]")

    async def _stream(
        self,
        body: Any,
        behaviour: Behaviour,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        await self._write(
            writer,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        for i, event in enumerate(self._events(body, behaviour)):
            if i == behaviour.reset_after_chunks:
                await self._reset(writer)
            if i and behaviour.chunk_delay:
                await self._pause(reader, behaviour.chunk_delay)
            await self._write(writer, b"%x\r\n%s\r\n" % (len(event), event))
        if behaviour.reset_after_chunks is not None:
            await self._reset(writer)
        await self._write(writer, b"0\r\n\r\n")

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
        padding: int = 0,
    ) -> None:
        data = json.dumps(payload).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        head.append(f"Content-Length: {len(data) + padding}")
        await self._write(writer, ("\r\n".join(head) + "\r\n\r\n").encode() + data)
        for piece in _pieces(b" ", padding):
            await self._write(writer, piece)


def _pieces(byte: bytes, count: int) -> Iterator[bytes]:
    """``count`` copies of ``byte``, in pieces of at most 64 KiB."""
    piece = byte * _PIECE
    for _ in range(count // _PIECE):
        yield piece
    if count % _PIECE:
        yield byte * (count % _PIECE)

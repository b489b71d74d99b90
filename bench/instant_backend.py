"""An OpenAI-compatible chat-completions server that answers at once, for benchmarks.

``python -m bench.instant_backend PORTFILE`` listens on 127.0.0.1 (an ephemeral port), writes the
port to ``PORTFILE`` (atomically) and prints ``PORT N``. It serves until SIGTERM/SIGINT, or until
its stdin closes when stdin is a pipe (the parent died).

``POST /v1/chat/completions`` answers a fixed nine-word reply: with ``"stream": true`` as
server-sent events in chunked transfer encoding (one HTTP chunk per event: five content deltas,
a finish_reason event, a usage event, ``[DONE]``), otherwise as one JSON body; both with usage.
Connections are kept alive (HTTP/1.1). The server is an ``asyncio.Protocol`` that parses and
answers inside ``data_received``, with the reply bytes prepared in advance: no task, no await
and one ``write`` per request.

Side channel for the benchmark (not timed):

- ``GET /stats``: JSON with ``count``, ``sum_ns``, ``mean_us``, ``p50_us``, ``p99_us``,
  ``max_us`` of the server's own service time per chat request (from the moment the request is
  complete in the buffer to the reply handed to the socket, ns), ``body_bytes_mean`` and
  ``connections`` (open now) / ``connections_total``. ``?samples=1`` adds ``samples_ns``, every
  service time since the last reset; ``?reset=1`` clears the samples after reading them.
- ``GET /last``: the body of the last chat request, verbatim.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
import time
from array import array
from pathlib import Path
from typing import Any

from bench.harness.processes import stop_when_parent_exits

MODEL = "instant"
REPLY_TEXT = "Your order is on its way and arrives tomorrow."
REPLY_WORDS = REPLY_TEXT.split(" ")
CHUNK_WORDS = 2  # words per streamed delta
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
COMPLETION_ID = "chatcmpl-instant"


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON, framed as one HTTP chunk."""
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


def _prepare() -> tuple[bytes, bytes, bytes]:
    """The streamed reply up to the usage event, the usage template and the end."""
    created = int(time.time())
    base = {"id": COMPLETION_ID, "object": "chat.completion.chunk", "created": created}
    base["model"] = MODEL
    parts = [
        " ".join(REPLY_WORDS[i : i + CHUNK_WORDS]) for i in range(0, len(REPLY_WORDS), CHUNK_WORDS)
    ]
    events = []
    for index, text in enumerate(parts):
        delta: dict[str, str] = {"content": (" " if index else "") + text}
        if index == 0:
            delta = {"role": "assistant", **delta}
        events.append(
            _event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        )
    events.append(_event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    head = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    usage = json.dumps({**base, "choices": [], "usage": "USAGE"}, separators=(",", ":"))
    usage_template = b"data: " + usage.replace('"USAGE"', "%s").encode() + b"\n\n"
    end = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    return head + b"".join(events), usage_template, end


STREAM_START, USAGE_TEMPLATE, STREAM_END = _prepare()
COMPLETION_TOKENS = len(REPLY_WORDS)


def _usage(prompt_tokens: int) -> bytes:
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
        prompt_tokens,
        COMPLETION_TOKENS,
        prompt_tokens + COMPLETION_TOKENS,
    )


def _response(status: str, content_type: bytes, body: bytes, close: bool = False) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status.encode(),
        content_type,
        len(body),
        b"Connection: close\r\n" if close else b"",
        body,
    )


def _error(status: str, message: str, close: bool = False) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    return _response(status, b"application/json", body.encode(), close)


class Stats:
    def __init__(self) -> None:
        self.samples = array("q")
        self.body_bytes = 0
        self.connections = 0
        self.connections_total = 0
        self.last_body = b""

    def report(self, samples: bool, reset: bool) -> bytes:
        values = sorted(self.samples)
        count = len(values)

        def pct(q: float) -> float | None:
            if not count:
                return None
            return values[min(count - 1, int(round(q * (count - 1))))] / 1000.0

        out: dict[str, Any] = {
            "count": count,
            "sum_ns": sum(values),
            "mean_us": sum(values) / count / 1000.0 if count else None,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "max_us": values[-1] / 1000.0 if count else None,
            "body_bytes_mean": self.body_bytes / count if count else None,
            "connections": self.connections,
            "connections_total": self.connections_total,
        }
        if samples:
            out["samples_ns"] = list(self.samples)
        if reset:
            self.samples = array("q")
            self.body_bytes = 0
        return json.dumps(out).encode()


STATS = Stats()


class InstantProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered as soon as they are complete."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        STATS.connections += 1
        STATS.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        STATS.connections -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        started = time.perf_counter_ns()
        buffer = self.buffer
        buffer += data
        while self.transport is not None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    self._fail("431 Request Header Fields Too Large", "header too large")
                return
            head = bytes(buffer[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self._fail("400 Bad Request", "malformed request line")
                return
            length = 0
            close = version != "HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        self._fail("400 Bad Request", "bad Content-Length")
                        return
                elif name == "transfer-encoding":
                    self._fail("411 Length Required", "send a Content-Length, not chunked")
                    return
                elif name == "connection":
                    token = value.strip().lower()
                    close = token == "close" or (close and token != "keep-alive")
            if length < 0 or length > MAX_BODY_BYTES:
                self._fail("413 Content Too Large", "body too large")
                return
            total = end + 4 + length
            if len(buffer) < total:
                return
            body = bytes(buffer[end + 4 : total])
            del buffer[:total]
            self._answer(method, target, body, close, started)
            if close:
                self.transport.close()
                return
            started = time.perf_counter_ns()

    def _fail(self, status: str, message: str) -> None:
        if self.transport is not None:
            self.transport.write(_error(status, message, close=True))
            self.transport.close()

    def _answer(self, method: str, target: str, body: bytes, close: bool, started: int) -> None:
        transport = self.transport
        assert transport is not None
        path, _, query = target.partition("?")
        if path == "/v1/chat/completions" and method == "POST":
            try:
                request = json.loads(body)
                messages = request["messages"]
                prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
            except (ValueError, KeyError, TypeError, AttributeError):
                transport.write(_error("400 Bad Request", "malformed chat request", close))
                return
            if request.get("stream"):
                usage = _chunk(USAGE_TEMPLATE % _usage(prompt_tokens))
                reply = STREAM_START + usage + STREAM_END
                if close:  # a chunked body ends itself; just say the connection goes
                    reply = reply.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            else:
                answer = (
                    b'{"id":"%s","object":"chat.completion","created":%d,"model":"%s",'
                    b'"choices":[{"index":0,"message":{"role":"assistant","content":"%s"},'
                    b'"finish_reason":"stop"}],"usage":%s}'
                    % (
                        COMPLETION_ID.encode(),
                        int(time.time()),
                        MODEL.encode(),
                        REPLY_TEXT.encode(),
                        _usage(prompt_tokens),
                    )
                )
                reply = _response("200 OK", b"application/json", answer, close)
            transport.write(reply)
            STATS.samples.append(time.perf_counter_ns() - started)
            STATS.body_bytes += len(body)
            STATS.last_body = body
        elif path == "/stats" and method == "GET":
            samples, reset = "samples=1" in query, "reset=1" in query
            transport.write(
                _response("200 OK", b"application/json", STATS.report(samples, reset), close)
            )
        elif path == "/last" and method == "GET":
            transport.write(_response("200 OK", b"application/json", STATS.last_body, close))
        else:
            transport.write(_error("404 Not Found", f"no route {method} {path}", close))


async def serve(portfile: Path) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(InstantProtocol, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    partial = portfile.with_name(portfile.name + ".partial")
    partial.write_text(f"{port}\n", encoding="ascii")
    os.replace(partial, portfile)
    print(f"PORT {port}", flush=True)
    gc.collect()
    gc.freeze()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stop_when_parent_exits(loop, stop)  # EOF on stdin: the parent died or closed the pipe
    await stop.wait()
    server.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.instant_backend PORTFILE", file=sys.stderr)
        return 2
    asyncio.run(serve(Path(argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""An OpenAI-compatible chat-completions backend over HTTP, streaming server-sent events.

One pooled ``aiohttp.ClientSession`` (created on the running loop at the first call) and one
semaphore per backend bound how many calls run at once. Every await of a call (waiting for a
slot, connecting, each read) is bounded by the earlier of the request's deadline and
``timeout_seconds``, and every read by size (a line, an event, the whole answer, an error body:
see :mod:`router.backends.common`); every failure becomes a :class:`BackendError` saying whether
a retry could help.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from router.backends._aio import closing
from router.backends.common import (
    MAX_ERROR_BODY_BYTES,
    MAX_EVENT_CHARS,
    MAX_LINE_CHARS,
    backend_error,
    call_end,
    count_tokens,
    estimate_prompt_tokens,
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

log = logging.getLogger("plexus.backends")

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
_SSE_FIELDS = ("data", "event", "id", "retry")
_DRAIN_SECONDS = 0.5  # after [DONE], read to the end of the body this long so the connection
# can go back to the pool; a server that holds it open longer just gets it closed
_KEEPALIVE_SECONDS = 5.0  # how long an idle pooled connection is kept
_ACCEPT = {"Accept": "application/json, text/event-stream"}
_JSON = {"Content-Type": "application/json"}
# Failures of the connection or of the HTTP exchange itself (resets, refusals, a peer that hangs
# up or breaks the protocol mid-body): a retry on a fresh connection could help.
_CONNECTION_ERRORS = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientResponseError,
    OSError,
)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


class OpenAIBackend:
    """A backend speaking OpenAI's ``POST {url}/chat/completions`` with ``stream: true``.

    It yields each content delta as it arrives, then one :class:`Finished` with the server's
    usage (estimated when the server sends none).
    """

    def __init__(self, name: str, config: BackendConfig):
        if config.kind != "openai":
            raise ValueError(f"backend {name!r}: OpenAIBackend needs kind 'openai'")
        self.name = name
        self.config = config
        self.endpoint = config.url.rstrip("/") + "/chat/completions"
        self._proxy, self._proxy_auth = _environment_proxy(self.endpoint)
        self._slots = PrioritySlots(config.max_concurrency)
        self._client: aiohttp.ClientSession | None = None  # made on the loop, at the first call
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        end = call_end(self.name, request, self.config.timeout_seconds)
        try:
            async with self._slot(end, request.priority):
                body = self._body(request)
                headers = self._headers()
                if request.traceparent:
                    headers["traceparent"] = request.traceparent
                response = await self._send(body, headers, end)
                try:
                    await self._check_status(response, end)
                    stream = self._read_stream(response, request, body["max_tokens"], end)
                    async with closing(stream) as events:
                        async for event in events:
                            yield event
                finally:
                    response.release()  # back to the pool if the body was read to its end
        except TimeoutError as exc:  # ours (asyncio.timeout_at) or aiohttp's (ClientTimeout)
            raise timed_out(self.name, request, self.config.timeout_seconds) from exc
        except _CONNECTION_ERRORS as exc:
            raise self._error(f"connection error ({_describe(exc)})", retryable=True) from exc
        except aiohttp.ClientError as exc:
            raise self._error(f"request failed ({type(exc).__name__}: {exc})") from exc

    # -- the call ----------------------------------------------------------------------------

    def _within(self, end: float) -> asyncio.Timeout:
        """A timeout at ``end`` (time.monotonic) on the loop's own clock."""
        loop = asyncio.get_running_loop()
        return asyncio.timeout_at(loop.time() + (end - time.monotonic()))

    @asynccontextmanager
    async def _slot(self, end: float, priority: int) -> AsyncIterator[None]:
        async with self._within(end):
            await self._slots.acquire(priority)
        try:
            yield
        finally:
            self._slots.release()

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": output_limit(request.max_tokens, self.config.max_output_tokens),
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.config.model:
            body["model"] = self.config.model
        return body

    def _headers(self) -> dict[str, str]:
        if not self.config.api_key_env:
            return {}
        key = os.environ.get(self.config.api_key_env, "")
        if not key:
            raise self._error(
                f"the environment variable {self.config.api_key_env} (api_key_env) is not set"
            )
        return {"Authorization": f"Bearer {key}"}

    def _session(self) -> aiohttp.ClientSession:
        client = self._client
        if client is None:
            if self._closed:
                raise RuntimeError(f"backend {self.name!r} is closed: aclose() was called")
            connector = aiohttp.TCPConnector(
                limit=self.config.max_concurrency,
                limit_per_host=0,
                keepalive_timeout=_KEEPALIVE_SECONDS,
            )
            client = self._client = aiohttp.ClientSession(
                connector=connector,
                headers=_ACCEPT,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
                # keep the cookies the server sets (a load balancer's sticky session, say), even
                # when its URL names an IP address
                cookie_jar=aiohttp.CookieJar(unsafe=True),
            )
        return client

    async def _send(
        self, body: dict[str, Any], headers: dict[str, str], end: float
    ) -> aiohttp.ClientResponse:
        session = self._session()
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        remaining = max(end - time.monotonic(), 0.001)
        async with self._within(end):
            return await session.post(
                self.endpoint,
                data=data.encode(),
                headers={**_JSON, **headers},
                timeout=aiohttp.ClientTimeout(total=remaining),
                allow_redirects=False,
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
            )

    async def _check_status(self, response: aiohttp.ClientResponse, end: float) -> None:
        status = response.status
        if status < 400:
            return
        try:
            raw = await self._read_some(response.content, MAX_ERROR_BODY_BYTES, end)
            detail = _error_detail(raw)
        except (TimeoutError, aiohttp.ClientError, OSError):
            detail = "(no readable body)"
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        raise BackendError(
            f"{self.name}: HTTP {status}: {detail}",
            backend=self.name,
            retryable=status in RETRYABLE_STATUSES,
            status=status,
            retry_after=retry_after,
        )

    async def _read_some(self, body: aiohttp.StreamReader, limit: int, end: float) -> bytes:
        """The body's first ``limit`` bytes (all of it if shorter); the rest is left unread, so
        releasing the response closes its connection."""
        parts: list[bytes] = []
        size = 0
        async with self._within(end):
            while size < limit:
                chunk = await body.read(limit - size)
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
        return b"".join(parts)

    async def _read_stream(
        self,
        response: aiohttp.ClientResponse,
        request: GenerationRequest,
        max_tokens: int,
        end: float,
    ) -> AsyncIterator[GenerationEvent]:
        data: list[str] = []  # the data lines of the event being read
        size = 0  # their characters
        tokens = 0
        reason: str | None = None
        usage: Usage | None = None
        done = False
        body = response.content
        lines = _Lines(_charset(response), MAX_LINE_CHARS)
        limit = response_limit(max_tokens)
        received = 0  # bytes of the body
        eof = False
        while not done and not eof:
            chunk = body.read_nowait()  # what has already arrived, without waiting
            if not chunk and not body.is_eof():
                async with self._within(end):
                    chunk = await body.readany()
            received += len(chunk)
            if received > limit:
                raise oversized(self.name, f"a response larger than {limit} bytes")
            eof = not chunk
            try:
                batch = lines.close() if eof else lines.feed(chunk)
            except _Oversized as exc:
                raise oversized(self.name, str(exc)) from None
            ready: list[str] = []  # this read's content: one delta, as long as it fits
            ready_tokens = 0
            for line in batch:
                if line:
                    if line.startswith("data:"):  # the usual field, without the general parse
                        value = line[6:] if line.startswith(" ", 5) else line[5:]
                        data.append(value)
                        size += len(value)
                    else:
                        for value in self._sse_line(line):
                            data.append(value)
                            size += len(value)
                    if size > MAX_EVENT_CHARS:
                        raise oversized(
                            self.name, f"an event larger than {MAX_EVENT_CHARS} characters"
                        )
                    continue
                if not data:  # a blank line ends an event; several in a row are harmless
                    continue
                payload = data[0] if len(data) == 1 else "\n".join(data)
                data.clear()
                size = 0
                if payload.strip() == "[DONE]":
                    done = True
                    break
                content, finish, chunk_usage = self._chunk(payload)
                reason = finish or reason
                usage = chunk_usage or usage
                if content:
                    counted = count_tokens(content)
                    if ready and tokens + counted > max_tokens:  # the bound cuts here, exactly
                        yield TokenDelta("".join(ready), ready_tokens)
                        ready.clear()
                        ready_tokens = 0
                    tokens += counted
                    ready_tokens += counted
                    ready.append(content)
            if ready:  # deltas that arrived together go on together: one event, one message
                yield TokenDelta(ready[0] if len(ready) == 1 else "".join(ready), ready_tokens)
        if done:
            await self._drain(body, limit - received, end)
        if not done and reason is None:
            raise self._error("stream ended early: no [DONE] and no finish_reason")
        yield Finished(reason or "stop", usage or Usage(estimate_prompt_tokens(request), tokens))

    def _sse_line(self, line: str) -> list[str]:
        """The data a line adds to the current event; comments and other fields add nothing."""
        if line.startswith(":"):
            return []
        field, colon, value = line.partition(":")
        if not colon or field not in _SSE_FIELDS:
            raise self._error(f"malformed SSE: expected 'data: ...', got {line[:80]!r}")
        if field != "data":
            return []
        return [value[1:] if value.startswith(" ") else value]

    def _chunk(self, payload: str) -> tuple[str | None, str | None, Usage | None]:
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise self._error(
                f"malformed JSON in a stream chunk at char {exc.pos} ({exc.msg}): {payload[:60]!r}"
            ) from None
        if not isinstance(chunk, dict):
            raise self._error(f"malformed stream chunk: expected a JSON object: {payload[:80]!r}")
        if "error" in chunk:
            raise self._error(f"error in the stream: {_error_message(chunk['error'])}")
        usage = _usage(chunk.get("usage"))
        choices = chunk.get("choices") or []
        if not isinstance(choices, list) or (choices and not isinstance(choices[0], dict)):
            raise self._error(f"malformed stream chunk: bad choices: {payload[:80]!r}")
        if not choices:
            return None, None, usage
        delta = choices[0].get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if content is not None and not isinstance(content, str):
            raise self._error(f"malformed stream chunk: content is not a string: {payload[:80]!r}")
        finish = choices[0].get("finish_reason")
        return content, (str(finish) if finish else None), usage

    async def _drain(self, body: aiohttp.StreamReader, budget: int, end: float) -> None:
        """Read what follows [DONE] (normally nothing), up to ``budget`` bytes, so that the
        connection can be reused; a body that goes on is left unread (its connection closed)."""
        try:
            while budget >= 0 and (chunk := body.read_nowait()):  # what has already arrived
                budget -= len(chunk)
            if body.is_eof() or budget < 0:
                return
            seconds = min(_DRAIN_SECONDS, end - time.monotonic())
            if seconds <= 0:
                return
            async with asyncio.timeout(seconds):
                while budget >= 0 and (chunk := await body.readany()):
                    budget -= len(chunk)
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass  # the response is released by the caller either way

    # -- errors ------------------------------------------------------------------------------

    def _error(self, message: str, *, retryable: bool = False) -> BackendError:
        return backend_error(self.name, message, retryable=retryable)


class _Oversized(Exception):
    """A part of the body exceeds its bound (the message says which)."""


class _Lines:
    """Splits a body into text lines at CRLF, LF or CR (as server-sent events do), however its
    bytes were cut into chunks; a line is only handed out once its end has arrived, and one
    longer than ``limit`` characters raises :class:`_Oversized` as soon as it is seen."""

    __slots__ = ("_decoder", "_limit", "_parts", "_pending")

    def __init__(self, encoding: str, limit: int):
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        self._limit = limit
        self._parts: list[str] = []  # the start of a line whose end has not arrived
        self._pending = 0  # its characters

    def feed(self, chunk: bytes) -> list[str]:
        text = self._decoder.decode(chunk)
        parts = self._parts
        if "\n" not in text and "\r" not in text:
            if text:
                parts.append(text)
                self._pending += len(text)
                if self._pending > self._limit:
                    raise self._too_long()
            return []
        if parts:
            parts.append(text)
            text = "".join(parts)
            parts.clear()
        if "\r" not in text:
            lines = text.split("\n")
            rest = lines.pop()
            if rest:
                parts.append(rest)
            return self._checked(lines, text, rest)
        held = text.endswith("\r")  # perhaps the first half of a CRLF cut between chunks
        if held:
            text = text[:-1]
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        rest = lines.pop()
        if rest or held:
            parts.append(rest + "\r" if held else rest)
        return self._checked(lines, text, rest)

    def close(self) -> list[str]:
        """The lines left at the end of the body (the last one may lack its line end)."""
        text = "".join(self._parts) + self._decoder.decode(b"", final=True)
        self._parts.clear()
        self._pending = 0
        if not text:
            return []
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if not lines[-1]:
            lines.pop()
        return self._checked(lines, text, "")

    def _checked(self, lines: list[str], text: str, rest: str) -> list[str]:
        self._pending = len(rest)
        # No line can be longer than the text it came from: the usual case costs one compare.
        if len(text) > self._limit and (
            len(rest) > self._limit or any(len(line) > self._limit for line in lines)
        ):
            raise self._too_long()
        return lines

    def _too_long(self) -> _Oversized:
        return _Oversized(f"a line longer than {self._limit} characters")


def _charset(response: aiohttp.ClientResponse) -> str:
    """The body's text encoding: the Content-Type's charset when Python knows it, else UTF-8."""
    charset = response.charset
    if charset:
        try:
            codecs.lookup(charset)
        except LookupError:
            return "utf-8"
        return charset
    return "utf-8"


def _environment_proxy(url: str) -> tuple[str | None, aiohttp.BasicAuth | None]:
    """The proxy for ``url`` from the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and
    NO_PROXY, as ``urllib.request`` reads them), looked up once rather than on every request."""
    target = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(target.scheme) or proxies.get("all")
    if not proxy or (target.hostname and urllib.request.proxy_bypass(target.hostname)):
        return None, None
    if "://" not in proxy:
        proxy = f"http://{proxy}"
    parsed = urllib.parse.urlsplit(proxy)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        log.warning("ignoring a %s proxy for %s: only http(s) proxies work", parsed.scheme, url)
        return None, None
    auth = None
    if parsed.username is not None:
        auth = aiohttp.BasicAuth(
            urllib.parse.unquote(parsed.username), urllib.parse.unquote(parsed.password or "")
        )
    netloc = parsed.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", "")), auth


def _usage(value: object) -> Usage | None:
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return Usage(prompt, completion)
    return None


def _error_message(value: object) -> str:
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        return str(value["message"])[:200]
    return str(value)[:200]


def _error_detail(raw: bytes) -> str:
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw[:200].decode("utf-8", "replace") or "(empty body)"
    if isinstance(parsed, dict) and "error" in parsed:
        return _error_message(parsed["error"])
    return raw[:200].decode("utf-8", "replace")


def _describe(exc: BaseException) -> str:
    """The exception and, when it only wraps one, the OS error underneath (e.g. a reset)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return f"{text}: {cause.strerror}" if str(exc) != cause.strerror else text
        cause = cause.__cause__ or cause.__context__
    return text

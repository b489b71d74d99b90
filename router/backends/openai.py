"""An OpenAI-compatible chat-completions backend over HTTP (streaming by default).

One pooled ``aiohttp.ClientSession`` (created on the running loop at the first call) and one
semaphore per backend bound how many calls run at once. Every await of a call (waiting for a
slot, connecting, each read) is bounded by the earlier of the request's deadline and
``timeout_seconds``; every failure becomes a :class:`BackendError` saying whether a retry could
help.
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


def estimate_prompt_tokens(request: GenerationRequest) -> int:
    """About four characters a token, when the server reports no usage."""
    return max(sum(len(m.content) for m in request.messages) // 4, 1)


class OpenAIBackend:
    """A backend speaking OpenAI's ``POST {url}/chat/completions``.

    ``stream=True`` (the default) asks for server-sent events and yields each content delta as it
    arrives; ``stream=False`` asks for one JSON answer and yields it as a single delta. Either
    way the last event is one :class:`Finished` with the server's usage (estimated when the
    server sends none).
    """

    def __init__(self, name: str, config: BackendConfig, *, stream: bool = True):
        if config.kind != "openai":
            raise ValueError(f"backend {name!r}: OpenAIBackend needs kind 'openai'")
        self.name = name
        self.config = config
        self.stream = stream
        self.endpoint = config.url.rstrip("/") + "/chat/completions"
        self._proxy, self._proxy_auth = _environment_proxy(self.endpoint)
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._client: aiohttp.ClientSession | None = None  # made on the loop, at the first call
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        end = self._end(request)
        try:
            async with self._slot(end):
                body = self._body(request)
                headers = self._headers()
                response = await self._send(body, headers, end)
                try:
                    await self._check_status(response, end)
                    if self.stream:
                        stream = self._read_stream(response, request, end)
                        async with closing(stream) as events:
                            async for event in events:
                                yield event
                    else:
                        for event in await self._read_whole(response, request, end):
                            yield event
                finally:
                    response.release()  # back to the pool if the body was read to its end
        except TimeoutError as exc:  # ours (asyncio.timeout_at) or aiohttp's (ClientTimeout)
            raise self._timed_out(request) from exc
        except _CONNECTION_ERRORS as exc:
            raise self._error(f"connection error ({_describe(exc)})", retryable=True) from exc
        except aiohttp.ClientError as exc:
            raise self._error(f"request failed ({type(exc).__name__}: {exc})") from exc

    # -- the call ----------------------------------------------------------------------------

    def _end(self, request: GenerationRequest) -> float:
        now = time.monotonic()
        end = now + self.config.timeout_seconds
        if request.deadline is not None:
            if request.deadline <= now:
                raise self._error("the request deadline has already passed")
            end = min(end, request.deadline)
        return end

    def _within(self, end: float) -> asyncio.Timeout:
        """A timeout at ``end`` (time.monotonic) on the loop's own clock."""
        loop = asyncio.get_running_loop()
        return asyncio.timeout_at(loop.time() + (end - time.monotonic()))

    @asynccontextmanager
    async def _slot(self, end: float) -> AsyncIterator[None]:
        async with self._within(end):
            await self._semaphore.acquire()
        try:
            yield
        finally:
            self._semaphore.release()

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        limit = self.config.max_output_tokens
        body: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": min(request.max_tokens, limit) if request.max_tokens > 0 else limit,
            "temperature": request.temperature,
        }
        if self.config.model:
            body["model"] = self.config.model
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
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
                raise RuntimeError("Cannot send a request, as the client has been closed.")
            connector = aiohttp.TCPConnector(
                limit=self.config.max_concurrency,
                limit_per_host=0,
                keepalive_timeout=_KEEPALIVE_SECONDS,
            )
            client = self._client = aiohttp.ClientSession(
                connector=connector,
                headers=_ACCEPT,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
                cookie_jar=aiohttp.CookieJar(unsafe=True),  # keep cookies, as httpx did
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
            async with self._within(end):
                raw = await response.read()
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

    async def _read_whole(
        self, response: aiohttp.ClientResponse, request: GenerationRequest, end: float
    ) -> list[GenerationEvent]:
        async with self._within(end):
            raw = await response.read()
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._error(
                f"malformed JSON in the response body ({exc}): {raw[:80]!r}"
            ) from None
        if not isinstance(answer, dict):
            raise self._error(f"malformed response: expected a JSON object, got {raw[:80]!r}")
        if "error" in answer:
            raise self._error(f"error in the response: {_error_message(answer['error'])}")
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._error("malformed response: no choices")
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            raise self._error("malformed response: choices[0].message.content is not a string")
        reason = choices[0].get("finish_reason") or "stop"
        text = content or ""
        usage = _usage(answer.get("usage")) or Usage(
            estimate_prompt_tokens(request), len(text.split())
        )
        events: list[GenerationEvent] = [TokenDelta(text)] if text else []
        events.append(Finished(str(reason), usage))
        return events

    async def _read_stream(
        self, response: aiohttp.ClientResponse, request: GenerationRequest, end: float
    ) -> AsyncIterator[GenerationEvent]:
        data: list[str] = []  # the data lines of the event being read
        deltas = 0
        reason: str | None = None
        usage: Usage | None = None
        done = False
        body = response.content
        lines = _Lines(_charset(response))
        eof = False
        while not done and not eof:
            chunk = body.read_nowait()  # what has already arrived, without waiting
            if not chunk and not body.is_eof():
                async with self._within(end):
                    chunk = await body.readany()
            if chunk:
                batch = lines.feed(chunk)
            else:
                eof = True
                batch = lines.close()
            for line in batch:
                if line:
                    if line.startswith("data:"):  # the usual field, without the general parse
                        data.append(line[6:] if line.startswith(" ", 5) else line[5:])
                    else:
                        data.extend(self._sse_line(line))
                    continue
                if not data:  # a blank line ends an event; several in a row are harmless
                    continue
                payload = data[0] if len(data) == 1 else "\n".join(data)
                data.clear()
                if payload.strip() == "[DONE]":
                    done = True
                    break
                content, finish, chunk_usage = self._chunk(payload)
                reason = finish or reason
                usage = chunk_usage or usage
                if content:
                    deltas += 1
                    yield TokenDelta(content)
        if done:
            await self._drain(body, end)
        if not done and reason is None:
            raise self._error("stream ended early: no [DONE] and no finish_reason")
        yield Finished(reason or "stop", usage or Usage(estimate_prompt_tokens(request), deltas))

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

    async def _drain(self, body: aiohttp.StreamReader, end: float) -> None:
        """Read what follows [DONE] (normally nothing) so the connection can be reused."""
        try:
            while body.read_nowait():  # what has already arrived
                pass
            if body.is_eof():
                return
            budget = min(_DRAIN_SECONDS, end - time.monotonic())
            if budget <= 0:
                return
            async with asyncio.timeout(budget):
                while await body.readany():
                    pass
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass  # the response is released by the caller either way

    # -- errors ------------------------------------------------------------------------------

    def _error(self, message: str, *, retryable: bool = False) -> BackendError:
        return BackendError(f"{self.name}: {message}", backend=self.name, retryable=retryable)

    def _timed_out(self, request: GenerationRequest) -> BackendError:
        past = request.deadline is not None and time.monotonic() >= request.deadline
        limit = (
            "the request deadline" if past else f"timeout_seconds={self.config.timeout_seconds:g}"
        )
        return self._error(f"timed out ({limit})", retryable=not past)


class _Lines:
    """Splits a body into text lines at CRLF, LF or CR (as server-sent events do), however its
    bytes were cut into chunks; a line is only handed out once its end has arrived."""

    __slots__ = ("_decoder", "_parts")

    def __init__(self, encoding: str):
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        self._parts: list[str] = []  # the start of a line whose end has not arrived

    def feed(self, chunk: bytes) -> list[str]:
        text = self._decoder.decode(chunk)
        parts = self._parts
        if "\n" not in text and "\r" not in text:
            if text:
                parts.append(text)
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
            return lines
        held = text.endswith("\r")  # perhaps the first half of a CRLF cut between chunks
        if held:
            text = text[:-1]
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        rest = lines.pop()
        if rest or held:
            parts.append(rest + "\r" if held else rest)
        return lines

    def close(self) -> list[str]:
        """The lines left at the end of the body (the last one may lack its line end)."""
        text = "".join(self._parts) + self._decoder.decode(b"", final=True)
        self._parts.clear()
        if not text:
            return []
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if not lines[-1]:
            lines.pop()
        return lines


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
    NO_PROXY, as httpx read them), looked up once rather than on every request."""
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

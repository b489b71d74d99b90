"""The OpenAI-compatible front door: ``POST /v1/chat/completions`` and ``GET /v1/models``.

One more adapter onto the pipeline, like the gRPC servicers, with no logic of its own: the
bearer token is a Plexus API key; ``model`` names one of the tenant's apps (``plexus/auto``:
the key's default app); the last user message is what Plexus routes, guards, stitches context
into and sends down the route's backend chain; earlier messages (system, developer, previous
turns) go before it, redacted as the request's text is. ``user`` and ``metadata`` become request
metadata (``user`` under the tenant's ``policy.user_field``). A W3C ``traceparent`` header
continues the caller's trace.

The answer comes back in OpenAI's shapes: a ``chat.completion``, or with ``stream: true``
server-sent ``chat.completion.chunk`` events ending in ``data: [DONE]``. Response headers carry
the route, model version and request id (``x-plexus-*``); the last chunk (or the completion)
carries a ``plexus`` object with those, the backend that answered, the rules applied and the
stage timings. Errors are OpenAI's error JSON with the matching HTTP status (401, 403, 404,
400, 429 with ``Retry-After``, 503, 504), never a stack trace; an error after the stream has
started is one ``data: {"error": ...}`` event, as OpenAI's own streams send them.

Bounds: a body over ``server.max_message_bytes`` is refused (413), a body not read within
``server.http_read_seconds`` ends the connection (408), and every call has the deadline
``server.http_timeout_seconds`` unless the client asks for less (``x-plexus-timeout``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web

from router.backends._aio import closing
from router.backends.types import Message
from router.calls import Caller, RouteQuery
from router.config import LoadedConfig
from router.errors import DeadlineExceeded, InvalidArgument, NotFound, PlexusError
from router.observe.tracing import TRACEPARENT
from router.pipeline import DecisionEvent, DeltaEvent, ErrorEvent, FinalEvent, OrchestrateEvent
from router.plexus import Plexus

log = logging.getLogger("plexus.http")

AUTO_MODEL = "plexus/auto"
ROLES = {"system", "developer", "user", "assistant"}
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "INTERRUPTED": 502,
    "BLOCKED": 403,
    "CANCELLED": 499,
}
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def _error(status: str, message: str, retry_after: float | None = None) -> web.Response:
    code = HTTP_STATUS.get(status, 500)
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPE.get(code, "api_error"),
            "param": None,
            "code": status.lower(),
        }
    }
    headers = {}
    if retry_after is not None and math.isfinite(retry_after):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return web.json_response(body, status=code, headers=headers)


def _text_of(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidArgument(f"{where}: only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidArgument(f"{where}: a text part needs a string 'text'")
            parts.append(text)
        return "\n".join(parts)
    raise InvalidArgument(f"{where}.content: expected a string or a list of text parts")


def parse_chat(body: Any) -> tuple[str, list[Message], str, dict[str, str], dict[str, Any]]:
    """``(model, history, last user text, metadata, options)`` of a chat completions body."""
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model: required; one of your apps, or plexus/auto")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages: a non-empty list is required")
    turns: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidArgument(f"messages.{i}.role: one of {sorted(ROLES)}")
        turns.append(Message(message["role"], _text_of(message.get("content"), f"messages.{i}")))
    if turns[-1].role != "user":
        raise InvalidArgument("messages: the last message must be the user's")
    metadata: dict[str, str] = {}
    raw = body.get("metadata") or {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise InvalidArgument("metadata: a map of strings to strings")
    metadata.update(raw)
    options: dict[str, Any] = {"stream": bool(body.get("stream", False))}
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name}: a positive integer")
            options.setdefault("max_tokens", value)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidArgument("user: a string")
    options["user"] = user
    stream_options = body.get("stream_options") or {}
    options["include_usage"] = bool(
        isinstance(stream_options, dict) and stream_options.get("include_usage")
    )
    return model, turns[:-1], turns[-1].content, metadata, options


class ChatFront:
    """The aiohttp handlers over one ``Plexus``."""

    def __init__(self, plexus: Plexus):
        self.plexus = plexus
        server = plexus.config
        self.max_body = server.max_message_bytes
        self.timeout = server.http_timeout_seconds
        self.read_seconds = server.http_read_seconds

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        return app

    def _caller(self, request: web.Request) -> Caller:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
        return self.plexus.keys.authenticate(key or request.headers.get("x-api-key"))

    def _app_of(self, caller: Caller, model: str) -> str:
        apps = self.plexus.loaded.config.tenants[caller.tenant].apps
        if model == AUTO_MODEL:
            allowed = [a for a in apps if caller.apps is None or a in caller.apps]
            return allowed[0]
        if model not in apps:
            raise NotFound(f"model {model[:80]!r} is not one of your apps: {sorted(apps)}")
        return model

    async def models(self, request: web.Request) -> web.Response:
        try:
            caller = self._caller(request)
        except PlexusError as exc:
            return _error(exc.status, str(exc))
        apps = self.plexus.loaded.config.tenants[caller.tenant].apps
        names = [AUTO_MODEL, *(a for a in apps if caller.apps is None or a in caller.apps)]
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": caller.tenant} for n in names
        ]
        return web.json_response({"object": "list", "data": data})

    async def _record_refusal(self, caller: Caller | None, error: PlexusError) -> None:
        """Record a call refused before it became a request (the pipeline's recorders see
        every call); the caller gets the refusal's own status even if that fails."""
        try:
            await self.plexus.pipeline.refused(caller, "ChatCompletions", error)
        except Exception:  # noqa: BLE001
            log.exception("recording a refused call failed")

    async def _refused(self, caller: Caller | None, error: PlexusError) -> web.Response:
        await self._record_refusal(caller, error)
        return _error(error.status, str(error), getattr(error, "retry_after", None))

    async def _too_large(self, caller: Caller | None) -> web.Response:
        error = InvalidArgument(f"the body is over {self.max_body} bytes")
        await self._record_refusal(caller, error)
        return _too_large_response(self.max_body)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        TRACEPARENT.set(request.headers.get("traceparent", ""))  # the caller's trace, if any
        caller = None
        try:
            caller = self._caller(request)
            if request.content_length is not None and request.content_length > self.max_body:
                return await self._too_large(caller)
            try:
                async with asyncio.timeout(self.read_seconds):
                    raw = await request.read()
            except TimeoutError:
                await self._record_refusal(
                    caller, DeadlineExceeded("the body was not sent in time")
                )
                return web.json_response(
                    {"error": {"message": "the body was not sent in time", "type": "timeout_error",
                               "param": None, "code": "request_timeout"}},
                    status=408,
                )  # fmt: skip
            except web.HTTPRequestEntityTooLarge:
                return await self._too_large(caller)
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise InvalidArgument("the body is not valid JSON") from None
            model, history, text, metadata, options = parse_chat(body)
            app = self._app_of(caller, model)
            if options["user"]:
                user_field = self.plexus.loaded.config.tenants[caller.tenant].policy.user_field
                metadata.setdefault(user_field, options["user"])
            request_id = request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
            query = RouteQuery(app, text, metadata, request_id=request_id)
            deadline = time.monotonic() + self._timeout(request)
            events = self.plexus.pipeline.orchestrate(
                caller,
                query,
                max_tokens=options.get("max_tokens"),
                deadline=deadline,
                history=history,
                rpc="ChatCompletions",
            )
            first = await anext(events)  # errors before the stream are statuses
        except PlexusError as exc:
            return await self._refused(caller, exc)
        except web.HTTPRequestEntityTooLarge:
            return await self._too_large(caller)
        except Exception:
            log.exception("unexpected error")
            return _error("INTERNAL", "internal error; the server logged it")
        assert isinstance(first, DecisionEvent)
        answer = _Answer(model, request_id, first)
        if options["stream"]:
            return await self._stream(request, events, answer, options["include_usage"])
        return await self._whole(events, answer)

    def _timeout(self, request: web.Request) -> float:
        asked = request.headers.get("x-plexus-timeout")
        try:
            seconds = float(asked) if asked else self.timeout
        except ValueError:
            raise InvalidArgument("x-plexus-timeout: seconds, e.g. 30") from None
        if not 0 < seconds <= self.timeout:
            seconds = self.timeout
        return seconds

    async def _whole(
        self, events: AsyncIterator[OrchestrateEvent], answer: _Answer
    ) -> web.Response:
        async with closing(events):
            async for event in events:
                if isinstance(event, DeltaEvent):
                    answer.text.append(event.text)
                elif isinstance(event, FinalEvent):
                    answer.final = event
                elif isinstance(event, ErrorEvent):
                    return _error(event.code, event.message)
        return web.json_response(answer.completion(), headers=answer.headers())

    async def _stream(
        self,
        request: web.Request,
        events: AsyncIterator[OrchestrateEvent],
        answer: _Answer,
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **answer.headers(),
            }
        )
        await response.prepare(request)
        # One write (one send) carries everything ready together: the role chunk goes with the
        # first delta, and the final chunk, the usage chunk and [DONE] with the end of the body.
        pending = [_sse(answer.chunk({"role": "assistant", "content": ""}))]
        async with closing(events):
            async for event in events:
                if isinstance(event, DeltaEvent):
                    pending.append(_sse(answer.chunk({"content": event.text})))
                    await response.write(b"".join(pending))
                    pending.clear()
                elif isinstance(event, FinalEvent):
                    answer.final = event
                    pending.append(_sse(answer.chunk({}, finish=True)))
                    if include_usage:
                        pending.append(_sse(answer.usage_chunk()))
                elif isinstance(event, ErrorEvent):
                    status = event.code
                    error = {"message": event.message, "type": "api_error", "code": status.lower()}
                    pending.append(_sse({"error": error}))
            pending.append(b"data: [DONE]\n\n")
        await response.write_eof(b"".join(pending))
        return response


class _Answer:
    """What one answer's responses say: its id, model, decision, text and final event."""

    def __init__(self, model: str, request_id: str, decision: DecisionEvent):
        self.id = f"chatcmpl-{request_id}"
        self.model = model
        self.request_id = request_id
        self.decision = decision.decision
        self.created = int(time.time())
        self.text: list[str] = []
        self.final: FinalEvent | None = None

    def headers(self) -> dict[str, str]:
        headers = {
            "x-plexus-route": self.decision.route,
            "x-plexus-model-version": self.decision.model_version,
            "x-plexus-request-id": self.request_id,
        }
        if self.final is not None:
            headers["x-plexus-backend"] = self.final.backend
        return headers

    def plexus(self) -> dict[str, Any]:
        final = self.final
        info: dict[str, Any] = {
            "route": self.decision.route,
            "model_version": self.decision.model_version,
            "confidence": self.decision.confidence,
            "request_id": self.request_id,
        }
        if final is not None:
            info |= {
                "backend": final.backend,
                "fallbacks_tried": final.fallbacks_tried,
                "rules_applied": final.rules_applied,
                "cost": final.cost,
                "timings_us": final.timings_us,
            }
        return info

    def _usage(self) -> dict[str, int]:
        usage = self.final.usage if self.final else None
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _finish(self) -> str:
        reason = self.final.finish_reason if self.final else "stop"
        return reason if reason in ("stop", "length", "content_filter") else "stop"

    def completion(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(self.text)},
                    "finish_reason": self._finish(),
                    "logprobs": None,
                }
            ],
            "usage": self._usage(),
            "plexus": self.plexus(),
        }

    def chunk(self, delta: Mapping[str, str], finish: bool = False) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "delta": dict(delta),
                    "finish_reason": self._finish() if finish else None,
                    "logprobs": None,
                }
            ],
        }
        if finish:
            chunk["plexus"] = self.plexus()
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self._usage(),
        }


def _sse(data: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _too_large_response(limit: int) -> web.Response:
    return web.json_response(
        {"error": {"message": f"the body is over {limit} bytes", "type": "invalid_request_error",
                   "param": None, "code": "request_too_large"}},
        status=413,
    )  # fmt: skip


def ssl_context(loaded: LoadedConfig) -> ssl.SSLContext | None:
    """HTTPS from ``server.tls``, as the gRPC side uses it (mutual TLS with ``client_ca``)."""
    tls = loaded.config.server.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(loaded.resolve(tls.cert), loaded.resolve(tls.key))
    if tls.client_ca is not None:
        context.load_verify_locations(loaded.resolve(tls.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_http(
    plexus: Plexus, address: str, grace_seconds: float = 5.0, reuse_port: bool = False
) -> tuple[web.AppRunner, int]:
    """Serve the front door on ``address`` (``HOST:PORT``; port 0 picks one); the runner to
    clean up, and the port."""
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(
        ChatFront(plexus).app(),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=grace_seconds,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        host.strip("[]") or None,
        int(port),
        ssl_context=ssl_context(plexus.loaded),
        reuse_port=reuse_port,
    )
    await site.start()
    sockets = site._server.sockets if site._server is not None else []  # noqa: SLF001
    return runner, int(sockets[0].getsockname()[1]) if sockets else int(port)

"""What every backend shares: when a call must end, its errors, the output limit, and the
bounds on what a backend may send.

Bounds (every read from a backend is bounded; exceeding one fails the call with a non-retryable
:class:`BackendError`, which the breaker counts and the fallback chain moves on from):

- ``MAX_LINE_CHARS``: one line of a server-sent-events body (1 Mi characters);
- ``MAX_EVENT_CHARS``: the data of one server-sent event (1 Mi characters);
- ``MAX_MESSAGE_BYTES``: one message from a gRPC Generator (1 MiB);
- :func:`response_limit`: all the bytes of one answer (16 MiB, or 1 KiB per output token
  allowed when that is more);
- ``MAX_ERROR_BODY_BYTES``: what is read of an error answer's body (64 KiB).

Output (enforced on every backend's stream by :func:`bound_output`):

- at most the request's ``max_tokens`` (clamped to the backend's ``max_output_tokens``), counted
  with :func:`count_tokens`; a stream that goes on past it is stopped with finish reason
  ``length`` and its upstream call closed;
- no delta longer than ``MAX_DELTA_CHARS`` characters (at most 64 KiB of UTF-8, so every delta
  fits a gRPC message with room to spare): longer ones are passed on in pieces.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from router.backends._aio import closing
from router.backends.types import (
    BackendError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenDelta,
    Usage,
)

MAX_LINE_CHARS = 1 << 20
MAX_EVENT_CHARS = 1 << 20
MAX_MESSAGE_BYTES = 1 << 20
MAX_RESPONSE_BYTES = 16 << 20
RESPONSE_BYTES_PER_TOKEN = 1 << 10
MAX_ERROR_BODY_BYTES = 64 << 10
MAX_DELTA_CHARS = 16 << 10  # four bytes a character at most: 64 KiB of UTF-8


def backend_error(name: str, message: str, *, retryable: bool = False) -> BackendError:
    """A failure of backend ``name``, its message prefixed with the name."""
    return BackendError(f"{name}: {message}", backend=name, retryable=retryable)


def call_end(name: str, request: GenerationRequest, timeout_seconds: float) -> float:
    """When a call must end (``time.monotonic``): ``timeout_seconds`` from now or the request's
    deadline, whichever is first. A deadline already passed is a non-retryable error."""
    now = time.monotonic()
    end = now + timeout_seconds
    if request.deadline is not None:
        if request.deadline <= now:
            raise backend_error(name, "the request deadline has already passed")
        end = min(end, request.deadline)
    return end


def timed_out(name: str, request: GenerationRequest, timeout_seconds: float) -> BackendError:
    """A call that ran out of time: retryable unless the request deadline itself has passed."""
    past = request.deadline is not None and time.monotonic() >= request.deadline
    limit = "the request deadline" if past else f"timeout_seconds={timeout_seconds:g}"
    return backend_error(name, f"timed out ({limit})", retryable=not past)


def output_limit(requested: int, configured: int) -> int:
    """The output tokens a call may produce: the request's ``max_tokens`` (when positive), never
    more than the backend's ``max_output_tokens``."""
    return min(requested, configured) if requested > 0 else configured


def response_limit(max_tokens: int) -> int:
    """The bytes one answer may take in all: ``MAX_RESPONSE_BYTES``, or
    ``RESPONSE_BYTES_PER_TOKEN`` per output token allowed when that is more."""
    return max(MAX_RESPONSE_BYTES, max_tokens * RESPONSE_BYTES_PER_TOKEN)


def oversized(name: str, what: str) -> BackendError:
    """A backend sent more than a bound allows (``what``, e.g. "a line longer than ...")."""
    return backend_error(name, f"oversized answer: {what}")


def count_tokens(text: str) -> int:
    """Output tokens a non-empty delta counts for: its whitespace-separated words, and at least
    one.

    A cheap lower bound on what the model produced: a server sends whole tokens, at least one a
    delta, and common tokenizers (byte-level BPE, SentencePiece) never make one token of two
    words. So a server keeping to ``max_tokens`` is never cut short, and one that ignores it is
    stopped at most a few words late per delta.
    """
    if not text:
        return 0
    return max(len(text.split()), 1)


def estimate_prompt_tokens(request: GenerationRequest) -> int:
    """About four characters a token, when the server reports no usage."""
    return max(sum(len(m.content) for m in request.messages) // 4, 1)


async def bound_output(
    events: AsyncIterator[GenerationEvent], request: GenerationRequest, max_tokens: int
) -> AsyncIterator[GenerationEvent]:
    """``events`` with the output bounds applied (see the module's docstring).

    A delta that would take the count past ``max_tokens`` is not passed on: the stream ends
    there with ``Finished("length", ...)`` (the prompt's usage estimated, the completion's
    counted), and ``events`` is closed, which closes its upstream call.
    """
    count = 0
    async with closing(events) as stream:
        async for event in stream:
            if not isinstance(event, TokenDelta):
                yield event
                continue
            text = event.text
            if not text:
                continue
            tokens = event.tokens or count_tokens(text)
            if count + tokens > max_tokens:
                yield Finished("length", Usage(estimate_prompt_tokens(request), count))
                return
            count += tokens
            if len(text) <= MAX_DELTA_CHARS:
                yield event
            else:
                for start in range(0, len(text), MAX_DELTA_CHARS):
                    yield TokenDelta(text[start : start + MAX_DELTA_CHARS])

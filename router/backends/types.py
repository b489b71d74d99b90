"""What the pipeline asks of a backend, and what comes back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[Message, ...]
    max_tokens: int
    temperature: float
    deadline: float | None = None  # time.monotonic() by which the whole call must end
    request_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # route, tenant: for logs only
    priority: int = 1  # 0 high, 1 normal, 2 low: who gets a busy backend's next free slot
    traceparent: str = ""  # W3C trace context for the call: an HTTP header, gRPC metadata


@dataclass(frozen=True)
class TokenDelta:
    text: str
    tokens: int = 0
    """The output tokens it counts for, when the backend knows (deltas that arrived together,
    passed on as one: the sum of theirs); 0: ``count_tokens(text)``."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | ...
    usage: Usage


GenerationEvent = TokenDelta | Finished


class BackendError(Exception):
    """A failed backend call. ``retryable``: connection errors, 429, 502/503/504, timeouts
    before the deadline; ``retry_after``: seconds the backend asked us to wait."""

    def __init__(
        self,
        message: str,
        *,
        backend: str,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.backend = backend
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


@runtime_checkable
class Backend(Protocol):
    """A generation backend: ``generate`` yields TokenDelta events, then one Finished, or raises
    BackendError. Retries, breakers, shares of the deadline and the output bounds (max_tokens,
    delta size) are applied around it by ``router.backends.resilience``."""

    name: str

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]: ...

    async def aclose(self) -> None: ...

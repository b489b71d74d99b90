"""Backends against real servers: what the caller receives for each fault.

The OpenAI-compatible backend talks HTTP to ``OpenAIPeer`` (a real server on 127.0.0.1 in its
own thread); the gRPC backend talks to a real grpc.aio Generator servicer. Every test that
opens HTTP backends checks, on teardown, that closing them leaves no connection open.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import grpc
import pytest

from router._generated.plexus.v1 import generator_pb2 as pb
from router._generated.plexus.v1 import generator_pb2_grpc as pb_grpc
from router.backends.common import (
    MAX_DELTA_CHARS,
    MAX_EVENT_CHARS,
    MAX_LINE_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_RESPONSE_BYTES,
    count_tokens,
    estimate_prompt_tokens,
)
from router.backends.grpc_backend import GrpcBackend
from router.backends.local import LocalBackend
from router.backends.openai import OpenAIBackend, parse_retry_after
from router.backends.resilience import (
    BackendPool,
    CircuitBreaker,
    FallbackChain,
    ResilientBackend,
    Served,
    StreamInterrupted,
    build_backend,
)
from router.backends.types import (
    BackendError,
    Finished,
    GenerationRequest,
    Message,
    TokenDelta,
    Usage,
)
from router.config import BackendConfig, BreakerConfig, RetryConfig

from .openai_peer import Behaviour, OpenAIPeer, prompt_tokens

PROMPT = "Which aisle has the blue kettles in store 1432?"
FAST_RETRY = RetryConfig(attempts=3, backoff_ms=1, max_backoff_ms=5)


# -- helpers ---------------------------------------------------------------------------------


def make_request(text: str = PROMPT, *, within: float | None = None) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message("system", "Be brief."), Message("user", text)),
        max_tokens=64,
        temperature=0.2,
        deadline=None if within is None else time.monotonic() + within,
        request_id="req-1",
        metadata={"route": "inventory_check", "tenant": "retail"},
    )


async def collect(events: AsyncIterator[Any]) -> tuple[list[Any], BackendError | None]:
    """Every event the caller receives, then the error that ended the stream (if any)."""
    got: list[Any] = []
    try:
        async for event in events:
            got.append(event)
    except BackendError as exc:
        return got, exc
    return got, None


def text_of(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenDelta))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def peer() -> Iterator[OpenAIPeer]:
    server = OpenAIPeer()
    yield server
    server.close()


OpenAIFactory = Callable[..., OpenAIBackend]


@pytest.fixture()
async def openai_backend(peer: OpenAIPeer) -> AsyncIterator[OpenAIFactory]:
    """Makes OpenAIBackends pointed at the peer; closing them must leave no connection open."""
    made: list[OpenAIBackend] = []

    def make(name: str = "primary", **overrides: Any) -> OpenAIBackend:
        settings: dict[str, Any] = {
            "url": peer.url,
            "model": "peer-model",
            "timeout_seconds": 5,
            "retry": FAST_RETRY,
        }
        settings.update(overrides)
        backend = OpenAIBackend(name, BackendConfig(kind="openai", **settings))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()
    assert await peer.wait_connections_closed() == 0, "a connection outlived aclose()"


def resilient(backend: OpenAIBackend | LocalBackend) -> ResilientBackend:
    """The backend with its own configuration's retries and breaker (seeded jitter)."""
    return ResilientBackend(backend, backend.config, rng=random.Random(0))


# -- the OpenAI-compatible backend -----------------------------------------------------------


async def test_streaming_success_yields_the_peers_text_and_usage(
    peer: OpenAIPeer, openai_backend: OpenAIFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEER_KEY", "sk-test")
    backend = openai_backend(api_key_env="PEER_KEY")

    events, error = await collect(backend.generate(make_request()))

    assert error is None
    assert text_of(events) == peer.behaviour.text
    # Deltas that arrive together are passed on as one, counting for all their tokens.
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    assert sum(d.tokens for d in deltas) == len(peer.behaviour.words())
    body = peer.requests[0].body
    assert events[-1] == Finished("stop", Usage(prompt_tokens(body), len(peer.behaviour.words())))
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "peer-model" and body["max_tokens"] == 64
    assert body["messages"][1] == {"role": "user", "content": PROMPT}
    assert peer.requests[0].headers["authorization"] == "Bearer sk-test"


async def test_usage_is_estimated_when_the_peer_reports_none(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    peer.behaviour = Behaviour(usage=False)
    request = make_request()

    events, error = await collect(openai_backend().generate(request))

    assert error is None
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    prompt_chars = sum(len(m.content) for m in request.messages)
    assert events[-1].usage == Usage(prompt_chars // 4, sum(d.tokens for d in deltas))
    assert sum(d.tokens for d in deltas) == len(peer.behaviour.words())


async def test_missing_api_key_variable_is_a_clear_error(
    peer: OpenAIPeer, openai_backend: OpenAIFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PEER_KEY_UNSET", raising=False)
    events, error = await collect(
        openai_backend(api_key_env="PEER_KEY_UNSET").generate(make_request())
    )
    assert events == [] and error is not None and not error.retryable
    assert "PEER_KEY_UNSET" in str(error) and peer.requests == []


async def test_slow_peer_ends_the_call_at_the_request_deadline(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    """The peer would wait 5 s before its first byte; the caller's deadline is 0.5 s."""
    peer.behaviour = Behaviour(first_byte_delay=5.0)
    backend = resilient(openai_backend())

    events, error = await collect(backend.generate(make_request(within=0.5)))

    assert events == []
    assert isinstance(error, BackendError)
    assert "timed out (the request deadline)" in str(error)
    assert not error.retryable  # the deadline has passed: nothing left to retry in
    assert len(peer.requests) == 1


async def test_slow_stream_is_cut_at_the_deadline_after_its_first_tokens(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    peer.behaviour = Behaviour(chunk_delay=0.2)
    chain = FallbackChain([resilient(openai_backend()), resilient(LocalBackend("local"))])

    events, error = await collect(chain.generate(make_request(within=0.5)))

    assert isinstance(error, StreamInterrupted)
    assert "timed out (the request deadline)" in str(error)
    assert text_of(events) == "Hello from"  # the role chunk, then a word every 0.2 s
    assert len(peer.requests) == 1


async def test_timeout_seconds_before_the_deadline_is_retryable(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    peer.behaviour = Behaviour(first_byte_delay=5.0)
    backend = openai_backend(timeout_seconds=0.3)

    events, error = await collect(backend.generate(make_request(within=10)))

    assert events == [] and error is not None
    assert "timed out (timeout_seconds=0.3)" in str(error) and error.retryable


async def test_503_then_success_is_retried_once(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    peer.script(Behaviour(status=503))
    chain = FallbackChain([resilient(openai_backend())])

    events, error = await collect(chain.generate(make_request()))

    assert error is None
    assert events[0] == Served("primary", attempts=2, fallbacks_tried=[])
    assert text_of(events) == peer.behaviour.text
    assert len(peer.requests) == 2


async def test_429_retry_after_is_honoured(peer: OpenAIPeer, openai_backend: OpenAIFactory) -> None:
    """Backoff alone would wait at most 5 ms; the peer asked for 0.2 s."""
    peer.script(Behaviour(status=429, retry_after="0.2"))
    backend = resilient(openai_backend())

    events, error = await collect(backend.generate(make_request(within=5)))

    assert error is None and text_of(events) == peer.behaviour.text
    first, second = peer.requests
    assert second.arrived - first.arrived >= 0.2


async def test_retry_after_beyond_the_deadline_is_not_waited_for(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    peer.behaviour = Behaviour(status=503, retry_after="30")
    backend = resilient(openai_backend())

    events, error = await collect(backend.generate(make_request(within=2)))

    assert events == [] and error is not None
    assert error.status == 503 and error.retry_after == 30 and error.retryable
    assert len(peer.requests) == 1  # gave up at once rather than sleep past the deadline


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("0.2") == 0.2
    assert parse_retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now) == 7
    assert parse_retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now) == 0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


async def test_500_is_not_retried(peer: OpenAIPeer, openai_backend: OpenAIFactory) -> None:
    peer.behaviour = Behaviour(status=500)
    backend = resilient(openai_backend())

    events, error = await collect(backend.generate(make_request()))

    assert events == [] and error is not None
    assert error.status == 500 and not error.retryable
    assert "HTTP 500: peer told to answer 500" in str(error)
    assert len(peer.requests) == 1


async def test_reset_mid_stream_interrupts_without_fallback(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    """Two words reached the caller, then the connection was reset: no retry, no fallback."""
    peer.behaviour = Behaviour(reset_after_chunks=3)  # the role chunk and two words
    chain = FallbackChain([resilient(openai_backend()), resilient(LocalBackend("local"))])

    events, error = await collect(chain.generate(make_request()))

    assert isinstance(error, StreamInterrupted)
    assert error.backend == "primary" and not error.retryable
    assert "connection error" in str(error) and "failed mid-answer" in str(error)
    assert events[0] == Served("primary", attempts=1, fallbacks_tried=[])
    assert text_of(events) == "Hello from"
    assert not any(isinstance(e, Served) and e.backend == "local" for e in events)
    assert len(peer.requests) == 1


async def test_reset_before_any_token_falls_back_to_the_next_backend(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    peer.behaviour = Behaviour(reset_after_chunks=0)
    chain = FallbackChain([resilient(openai_backend()), resilient(LocalBackend("local"))])

    events, error = await collect(chain.generate(make_request()))

    assert error is None
    assert events[0] == Served("local", attempts=1, fallbacks_tried=["primary"])
    assert text_of(events).startswith("[local:local] route=inventory_check I was given 2")
    assert isinstance(events[-1], Finished)
    assert len(peer.requests) == 3  # the primary's three tries (a reset is retryable)


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (Behaviour(malformed_json=True), "malformed JSON in a stream chunk at char"),
        (Behaviour(malformed_sse=True), "malformed SSE: expected 'data: ...', got 'this line"),
        (Behaviour(end_early=True), "stream ended early: no [DONE] and no finish_reason"),
    ],
    ids=["malformed-json", "malformed-sse", "ended-early"],
)
async def test_malformed_streams_are_not_retried(
    peer: OpenAIPeer, openai_backend: OpenAIFactory, behaviour: Behaviour, message: str
) -> None:
    peer.behaviour = behaviour
    backend = resilient(openai_backend())

    events, error = await collect(backend.generate(make_request()))

    assert error is not None and not error.retryable
    assert message in str(error)
    assert not any(isinstance(e, Finished) for e in events)
    assert len(peer.requests) == 1


async def test_circuit_breaker_opens_rejects_probes_and_closes(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    clock = FakeClock()
    config = BackendConfig(
        kind="openai",
        url=peer.url,
        retry=RetryConfig(attempts=1),
        breaker=BreakerConfig(failures=2, reset_seconds=10),
    )
    backend = ResilientBackend(openai_backend(), config, rng=random.Random(0), clock=clock)
    peer.behaviour = Behaviour(status=500)

    for _ in range(2):
        _, error = await collect(backend.generate(make_request()))
        assert error is not None and error.status == 500
    assert backend.breaker.state == "open"

    _, error = await collect(backend.generate(make_request()))
    assert error is not None and "circuit open" in str(error) and not error.retryable
    assert len(peer.requests) == 2  # rejected without calling the peer

    clock.now += 10
    assert backend.breaker.state == "half_open"
    peer.behaviour = Behaviour(first_byte_delay=0.2)
    probe = asyncio.create_task(collect(backend.generate(make_request())))
    await peer.wait_requests(3)
    _, error = await collect(backend.generate(make_request()))  # a second caller, mid-probe
    assert error is not None and "circuit open" in str(error)
    events, error = await probe
    assert error is None and text_of(events) == peer.behaviour.text
    assert backend.breaker.state == "closed"
    assert len(peer.requests) == 3


async def test_breaker_opened_by_retries_reports_the_real_failure(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    peer.behaviour = Behaviour(status=503)
    config = BackendConfig(
        kind="openai", url=peer.url, retry=FAST_RETRY, breaker=BreakerConfig(failures=2)
    )
    backend = ResilientBackend(openai_backend(), config, rng=random.Random(0))

    events, error = await collect(backend.generate(make_request()))

    assert events == [] and error is not None
    assert error.status == 503 and "circuit open" not in str(error)
    assert backend.breaker.state == "open"
    assert len(peer.requests) == 2  # the third try was refused by the breaker


def test_circuit_breaker_half_open_failure_reopens() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("b", BreakerConfig(failures=1, reset_seconds=5), clock=clock)
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 5
    breaker.before_call()  # the probe
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 4.9
    with pytest.raises(BackendError, match="circuit open"):
        breaker.before_call()
    clock.now += 0.1
    breaker.before_call()
    breaker.release()  # the probe was abandoned: the next caller may probe
    breaker.before_call()
    breaker.record_success()
    assert breaker.state == "closed"


async def test_max_concurrency_is_enforced(peer: OpenAIPeer, openai_backend: OpenAIFactory) -> None:
    peer.behaviour = Behaviour(first_byte_delay=0.1)
    backend = openai_backend(max_concurrency=2)

    results = await asyncio.gather(*(collect(backend.generate(make_request())) for _ in range(6)))

    assert all(error is None for _, error in results)
    assert len(peer.requests) == 6
    assert peer.max_active == 2


async def test_no_connection_or_task_leaks_after_faults(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    """One pooled connection survives every fault: a response left open would block the pool."""
    backend = openai_backend(max_concurrency=1)
    faults = [
        Behaviour(status=500),
        Behaviour(status=429, retry_after="0"),
        Behaviour(malformed_json=True),
        Behaviour(malformed_sse=True),
        Behaviour(end_early=True),
        Behaviour(reset_after_chunks=2),
        Behaviour(first_byte_delay=5),
    ]
    for behaviour in faults:
        peer.behaviour = behaviour
        _, error = await collect(backend.generate(make_request(within=0.5)))
        assert error is not None
    peer.behaviour = Behaviour(chunk_delay=0.01)
    abandoned = backend.generate(make_request())
    async for _ in abandoned:
        break  # the caller walks away after one event
    await abandoned.aclose()  # type: ignore[attr-defined]

    peer.behaviour = Behaviour()
    events, error = await collect(backend.generate(make_request(within=2)))
    assert error is None and text_of(events) == peer.behaviour.text
    assert peer.open_connections <= 1

    await backend.aclose()
    assert await peer.wait_connections_closed() == 0
    await asyncio.sleep(0)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


# -- bounds on what a backend may send -------------------------------------------------------

BIG = 128 << 20  # an oversized part the peer would send: far more than any bound
READ_AT_MOST = 64 << 20  # what the peer may have sent by then (a bound + socket buffers)


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (
            Behaviour(unterminated_line=BIG),
            f"a line longer than {MAX_LINE_CHARS} characters",
        ),
        (
            Behaviour(event_lines=BIG // (64 << 10)),
            f"an event larger than {MAX_EVENT_CHARS} characters",
        ),
        (Behaviour(padding=BIG), f"a response larger than {MAX_RESPONSE_BYTES} bytes"),
    ],
    ids=["unterminated-line", "many-line-event", "endless-comments"],
)
async def test_oversized_streams_fail_cleanly_and_count_on_the_breaker(
    peer: OpenAIPeer, openai_backend: OpenAIFactory, behaviour: Behaviour, message: str
) -> None:
    """The peer would send 128 MiB before any content; the client stops at its bound, hangs up
    (the connection is not pooled) and fails the call without a retry."""
    peer.behaviour = behaviour
    backend = resilient(openai_backend(breaker=BreakerConfig(failures=1)))

    events, error = await collect(backend.generate(make_request()))

    assert events == [] and error is not None and not error.retryable
    assert message in str(error)
    assert len(peer.requests) == 1 and backend.breaker.state == "open"
    assert await peer.wait_hangups(1) == 1 and peer.sent[0] < READ_AT_MOST
    assert await peer.wait_connections_closed() == 0


async def test_a_huge_error_body_is_read_only_in_part(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    peer.behaviour = Behaviour(status=500, body_padding=BIG)

    events, error = await collect(openai_backend().generate(make_request()))

    assert events == [] and error is not None and error.status == 500
    assert "HTTP 500: peer told to answer 500" in str(error)
    assert await peer.wait_hangups(1) == 1 and peer.sent[0] < READ_AT_MOST


async def test_a_runaway_stream_is_stopped_at_max_tokens(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    """The peer ignores max_tokens (64) and would stream a million words; the caller gets 64,
    a Finished with reason ``length``, and the upstream connection is closed."""
    peer.behaviour = Behaviour(text="w", repeat=1_000_000)
    request = make_request()

    events, error = await collect(resilient(openai_backend()).generate(request))

    assert error is None
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    assert sum(d.tokens for d in deltas) == len("".join(d.text for d in deltas).split()) == 64
    assert request.max_tokens == 64
    assert events[-1] == Finished("length", Usage(estimate_prompt_tokens(request), 64))
    assert await peer.wait_hangups(1) == 1
    assert await peer.wait_connections_closed() == 0


async def test_a_stream_of_exactly_max_tokens_is_passed_on_whole(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    """Each delta counts as at least one token, so a server keeping to the limit is never cut."""
    peer.behaviour = Behaviour(text=" ".join(f"w{i}" for i in range(64)))

    events, error = await collect(resilient(openai_backend()).generate(make_request()))

    assert error is None and text_of(events) == peer.behaviour.text
    assert events[-1] == Finished("stop", Usage(prompt_tokens(peer.requests[0].body), 64))
    assert peer.hangups == 0


def test_token_counting_is_a_lower_bound_on_real_tokens() -> None:
    assert [count_tokens(t) for t in ["", " ", "Hello", " from the", "peer,  one\nword"]] == [
        0,
        1,
        1,
        2,
        3,
    ]


async def test_large_deltas_reach_the_caller_in_pieces_that_fit_a_message(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    """A 200 KB delta of four-byte characters arrives whole, in pieces of at most 64 KiB."""
    peer.behaviour = Behaviour(big_delta=50_000, big_delta_after=1, big_delta_char="\U0001d11e")

    events, error = await collect(resilient(openai_backend()).generate(make_request()))

    assert error is None and isinstance(events[-1], Finished)
    pieces = [e.text for e in events if isinstance(e, TokenDelta)]
    assert max(len(p.encode()) for p in pieces) <= MAX_DELTA_CHARS * 4 == 64 << 10
    assert (
        "".join(pieces) == "Hello" + "\U0001d11e" * 50_000 + " from the peer, one word at a time."
    )


async def test_an_oversized_delta_before_the_first_token_falls_back(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    """A 6 MB content chunk is a failure of the backend: not retried, counted, fallen back from."""
    peer.behaviour = Behaviour(big_delta=6_000_000, big_delta_after=0)
    primary = resilient(openai_backend(breaker=BreakerConfig(failures=1)))
    chain = FallbackChain([primary, resilient(LocalBackend("local"))])

    events, error = await collect(chain.generate(make_request()))

    assert error is None
    assert events[0] == Served("local", attempts=1, fallbacks_tried=["primary"])
    assert len(peer.requests) == 1 and primary.breaker.state == "open"


async def test_an_oversized_delta_after_the_first_token_interrupts(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    peer.behaviour = Behaviour(big_delta=6_000_000, big_delta_after=2)
    primary = resilient(openai_backend(breaker=BreakerConfig(failures=1)))
    chain = FallbackChain([primary, resilient(LocalBackend("local"))])

    events, error = await collect(chain.generate(make_request()))

    assert isinstance(error, StreamInterrupted) and error.backend == "primary"
    assert f"a line longer than {MAX_LINE_CHARS} characters" in str(error)
    assert text_of(events) == "Hello from"
    assert len(peer.requests) == 1 and primary.breaker.state == "open"


# -- shares of the deadline ------------------------------------------------------------------


@pytest.fixture()
def second_peer() -> Iterator[OpenAIPeer]:
    server = OpenAIPeer(Behaviour(text="The fallback answers in time."))
    yield server
    server.close()


@pytest.mark.parametrize(
    "hang",
    [Behaviour(first_byte_delay=30), Behaviour(chunk_delay=30)],
    ids=["before-the-headers", "after-the-headers"],
)
async def test_a_hanging_primary_leaves_the_fallback_its_turn(
    peer: OpenAIPeer, second_peer: OpenAIPeer, openai_backend: OpenAIFactory, hang: Behaviour
) -> None:
    """Under a 3 s deadline, the primary's tries (three allowed) wait for a first token only
    within its share; the fallback, a healthy server, then answers before the deadline."""
    peer.behaviour = hang
    primary = resilient(openai_backend())
    fallback = resilient(openai_backend("fallback", url=second_peer.url))
    request = make_request(within=3)

    events, error = await collect(FallbackChain([primary, fallback]).generate(request))

    assert error is None
    assert request.deadline is not None and time.monotonic() < request.deadline
    assert events[0] == Served("fallback", attempts=1, fallbacks_tried=["primary"])
    assert text_of(events) == second_peer.behaviour.text
    assert isinstance(events[-1], Finished)
    assert 1 <= len(peer.requests) <= FAST_RETRY.attempts


async def test_a_share_bounds_only_the_wait_for_the_first_token(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    """The primary's share of an 8 s deadline is about 1.3 s a try; its answer, started at once,
    takes about 2 s and is not cut."""
    peer.behaviour = Behaviour(text="one two three four", chunk_delay=0.3)
    chain = FallbackChain([resilient(openai_backend()), resilient(LocalBackend("local"))])

    events, error = await collect(chain.generate(make_request(within=8)))

    assert error is None and text_of(events) == "one two three four"
    assert events[0] == Served("primary", attempts=1, fallbacks_tried=[])
    assert len(peer.requests) == 1


# -- the local backend -----------------------------------------------------------------------


async def test_local_backend_is_deterministic_and_counts_honestly() -> None:
    backend = LocalBackend("demo")
    request = GenerationRequest(
        messages=(Message("system", "Be brief."), Message("user", "x " * 150)),
        max_tokens=512,
        temperature=0,
        metadata={"route": "inventory_check"},
    )

    first, _ = await collect(backend.generate(request))
    second, _ = await collect(backend.generate(request))

    assert first == second
    reply = text_of(first)
    assert reply.startswith("[local:demo] route=inventory_check I was given 2 messages;")
    assert reply.endswith("...")  # the last message shown cut to 200 characters
    assert first[-1] == Finished("stop", Usage(2 + 150, len(reply.split())))
    short = GenerationRequest(messages=request.messages, max_tokens=3, temperature=0)
    events, _ = await collect(backend.generate(short))
    assert events[-1] == Finished("length", Usage(152, 3))


# -- the gRPC Generator backend --------------------------------------------------------------


class FakeGenerator(pb_grpc.GeneratorServicer):
    """A tiny Generator: fails with the queued status codes first, then answers."""

    def __init__(self) -> None:
        self.words = ["generated", "by", "the", "fake", "generator"]
        self.failures: deque[grpc.StatusCode] = deque()
        self.delay = 0.0
        self.calls = 0
        self.requests: list[pb.GenerateRequest] = []

    async def Generate(  # noqa: N802 - the RPC's name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        self.calls += 1
        self.requests.append(request)
        if self.failures:
            await context.abort(self.failures.popleft(), "told to fail")
        await asyncio.sleep(self.delay)
        for i, word in enumerate(self.words):
            yield pb.GenerateEvent(delta=word if i == 0 else " " + word)
        prompt = sum(len(m.content.split()) for m in request.messages)
        yield pb.GenerateEvent(
            done=pb.Done(
                finish_reason="stop", prompt_tokens=prompt, completion_tokens=len(self.words)
            )
        )


@pytest.fixture()
async def generator() -> AsyncIterator[tuple[FakeGenerator, str]]:
    servicer = FakeGenerator()
    server = grpc.aio.server()
    pb_grpc.add_GeneratorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_grpc_backend_streams_from_a_generator(
    generator: tuple[FakeGenerator, str],
) -> None:
    servicer, address = generator
    backend = GrpcBackend("own-model", BackendConfig(kind="grpc", url=address, model="m1"))
    try:
        events, error = await collect(backend.generate(make_request(within=5)))
    finally:
        await backend.aclose()

    assert error is None
    assert text_of(events) == "generated by the fake generator"
    assert events[-1] == Finished("stop", Usage(2 + 9, 5))
    sent = servicer.requests[0]
    assert sent.model == "m1" and sent.request_id == "req-1" and sent.max_tokens == 64
    assert [(m.role, m.content) for m in sent.messages] == [
        ("system", "Be brief."),
        ("user", PROMPT),
    ]


async def test_grpc_unavailable_is_retried_and_invalid_argument_is_not(
    generator: tuple[FakeGenerator, str],
) -> None:
    servicer, address = generator
    config = BackendConfig(kind="grpc", url=address, retry=FAST_RETRY)
    backend = ResilientBackend(GrpcBackend("own-model", config), config, rng=random.Random(0))
    try:
        servicer.failures.extend([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
        events, error = await collect(backend.generate(make_request(within=5)))
        assert error is None and text_of(events) == "generated by the fake generator"
        assert servicer.calls == 3

        servicer.failures.append(grpc.StatusCode.INVALID_ARGUMENT)
        events, error = await collect(backend.generate(make_request(within=5)))
        assert events == [] and error is not None and not error.retryable
        assert "INVALID_ARGUMENT: told to fail" in str(error)
        assert servicer.calls == 4
    finally:
        await backend.aclose()


async def test_grpc_slow_generator_ends_at_the_deadline(
    generator: tuple[FakeGenerator, str],
) -> None:
    servicer, address = generator
    servicer.delay = 5.0
    config = BackendConfig(kind="grpc", url=address, max_concurrency=1)
    backend = ResilientBackend(GrpcBackend("own-model", config), config, rng=random.Random(0))
    try:
        events, error = await collect(backend.generate(make_request(within=0.3)))
        assert events == [] and error is not None and not error.retryable
        assert "timed out (the request deadline)" in str(error)
        assert servicer.calls == 1
        servicer.delay = 0.0  # the one slot was given back
        events, error = await collect(backend.generate(make_request(within=5)))
        assert error is None and text_of(events) == "generated by the fake generator"
    finally:
        await backend.aclose()


async def test_grpc_oversized_message_fails_without_retry(
    generator: tuple[FakeGenerator, str],
) -> None:
    servicer, address = generator
    servicer.words = ["x" * (2 << 20)]
    config = BackendConfig(
        kind="grpc", url=address, retry=FAST_RETRY, breaker=BreakerConfig(failures=1)
    )
    backend = ResilientBackend(GrpcBackend("own-model", config), config, rng=random.Random(0))
    try:
        events, error = await collect(backend.generate(make_request(within=5)))
    finally:
        await backend.aclose()

    assert events == [] and error is not None and not error.retryable
    assert f"a message larger than {MAX_MESSAGE_BYTES} bytes" in str(error)
    assert servicer.calls == 1 and backend.breaker.state == "open"


async def test_grpc_runaway_stream_is_stopped_at_max_tokens(
    generator: tuple[FakeGenerator, str],
) -> None:
    servicer, address = generator
    servicer.words = ["w"] * 1000
    config = BackendConfig(kind="grpc", url=address)
    backend = ResilientBackend(GrpcBackend("own-model", config), config, rng=random.Random(0))
    request = make_request(within=5)
    try:
        events, error = await collect(backend.generate(request))
    finally:
        await backend.aclose()

    assert error is None
    assert len([e for e in events if isinstance(e, TokenDelta)]) == 64
    assert events[-1] == Finished("length", Usage(estimate_prompt_tokens(request), 64))


# -- the pool --------------------------------------------------------------------------------


async def test_pool_builds_chains_and_reports_breakers(peer: OpenAIPeer) -> None:
    pool = BackendPool(
        {
            "primary": BackendConfig(kind="openai", url=peer.url, retry=RetryConfig(attempts=1)),
            "own": BackendConfig(kind="grpc", url="127.0.0.1:1"),
            "local": BackendConfig(kind="local"),
        }
    )
    assert isinstance(build_backend("x", BackendConfig(kind="local")), LocalBackend)
    try:
        peer.behaviour = Behaviour(status=502)
        events, error = await collect(
            pool.chain("primary", ["local", "primary"]).generate(make_request())
        )
        assert error is None
        assert events[0] == Served("local", attempts=1, fallbacks_tried=["primary"])
        assert pool.breaker_states() == {"primary": "closed", "own": "closed", "local": "closed"}
        assert pool.breaker_states(["local", "primary"]) == {"local": "closed", "primary": "closed"}
        assert pool.breaker_state("own") == "closed"
        with pytest.raises(KeyError, match="unknown backends"):
            pool.chain("primary", ["nowhere"])
    finally:
        await pool.aclose()
    assert await peer.wait_connections_closed() == 0


async def test_all_backends_failing_names_each_failure(peer: OpenAIPeer) -> None:
    peer.behaviour = Behaviour(status=400)
    pool = BackendPool(
        {
            "a": BackendConfig(kind="openai", url=peer.url),
            "b": BackendConfig(kind="openai", url=peer.url),
        }
    )
    try:
        events, error = await collect(pool.chain("a", ["b"]).generate(make_request()))
    finally:
        await pool.aclose()
    assert events == [] and error is not None and not isinstance(error, StreamInterrupted)
    assert str(error).startswith("all backends failed: a: HTTP 400")
    assert "; b: HTTP 400" in str(error)


async def test_deltas_that_arrive_apart_stay_apart(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    peer.behaviour = Behaviour(text="one two three", chunk_delay=0.05)
    events, error = await collect(openai_backend().generate(make_request()))
    assert error is None
    assert [e.text.strip() for e in events if isinstance(e, TokenDelta)] == ["one", "two", "three"]

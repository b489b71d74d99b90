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

    def make(name: str = "primary", *, stream: bool = True, **overrides: Any) -> OpenAIBackend:
        settings: dict[str, Any] = {
            "model": "peer-model",
            "timeout_seconds": 5,
            "retry": FAST_RETRY,
        }
        settings.update(overrides)
        config = BackendConfig(kind="openai", url=peer.url, **settings)
        backend = OpenAIBackend(name, config, stream=stream)
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
    assert len([e for e in events if isinstance(e, TokenDelta)]) == len(peer.behaviour.words())
    body = peer.requests[0].body
    assert events[-1] == Finished("stop", Usage(prompt_tokens(body), len(peer.behaviour.words())))
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "peer-model" and body["max_tokens"] == 64
    assert body["messages"][1] == {"role": "user", "content": PROMPT}
    assert peer.requests[0].headers["authorization"] == "Bearer sk-test"


async def test_non_streaming_success_is_one_delta_with_real_usage(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    backend = openai_backend(stream=False)

    events, error = await collect(backend.generate(make_request()))

    assert error is None
    assert events[0] == TokenDelta(peer.behaviour.text)
    body = peer.requests[0].body
    assert "stream" not in body
    assert events[1] == Finished("stop", Usage(prompt_tokens(body), len(peer.behaviour.words())))
    assert len(events) == 2


async def test_usage_is_estimated_when_the_peer_reports_none(
    peer: OpenAIPeer, openai_backend: OpenAIFactory
) -> None:
    peer.behaviour = Behaviour(usage=False)
    request = make_request()

    events, error = await collect(openai_backend().generate(request))

    assert error is None
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    prompt_chars = sum(len(m.content) for m in request.messages)
    assert events[-1].usage == Usage(prompt_chars // 4, len(deltas))


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

    words = ["generated", "by", "the", "fake", "generator"]

    def __init__(self) -> None:
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
            done=pb.Done(finish_reason="stop", prompt_tokens=prompt, completion_tokens=5)
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

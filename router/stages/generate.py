"""Generate: the stitched prompt, sent down policy's backend chain, streamed back.

Retries, circuit breakers and fallbacks live in ``router/backends/resilience.py``; this stage
builds the request from the state and prices the answer with the backend that gave it. The
request carries a W3C ``traceparent`` naming the generate span (``router/observe/tracing.py``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping

from router.backends.resilience import BackendPool, Served
from router.backends.slots import PRIORITIES
from router.backends.types import GenerationEvent, GenerationRequest, Message, Usage
from router.config import BackendConfig
from router.observe.tracing import Tracing, outgoing_traceparent
from router.pipeline import RequestState


async def _first_token_noted(
    state: RequestState, events: AsyncGenerator[GenerationEvent | Served, None]
) -> AsyncGenerator[GenerationEvent | Served, None]:
    """``events`` as they come, noting in ``state.first_token_ns`` and ``state.served_by`` when
    and which backend answered (``Served`` comes right before its first token)."""
    try:
        async for event in events:
            if type(event) is Served and not state.first_token_ns:
                state.first_token_ns = time.time_ns()
                state.served_by = event.backend
            yield event
    finally:
        await events.aclose()


class Generate:
    name = "generate"

    def __init__(
        self,
        pools: Mapping[str, BackendPool],
        backends: Mapping[str, Mapping[str, BackendConfig]],
        *,
        tracing: Tracing | None = None,
        note_first_token: bool = False,
    ):
        """``tracing`` decides the backends' ``traceparent``; ``note_first_token`` sets
        ``state.first_token_ns`` (for the time-to-first-token metric and span event)."""
        self.pools = pools
        self.backends = backends
        self.tracing = tracing
        self.note_first_token = note_first_token

    def stream(self, state: RequestState) -> AsyncGenerator[GenerationEvent | Served, None]:
        assert state.context is not None and state.limits is not None and state.decision
        state.trace.generate_ns = time.time_ns()
        request = GenerationRequest(
            messages=(*state.history, Message("user", state.context.assembly.prompt)),
            max_tokens=state.limits.max_tokens,
            temperature=state.limits.temperature,
            deadline=state.deadline,
            request_id=state.query.request_id,
            metadata={"tenant": state.caller.tenant, "route": state.decision.route},
            priority=PRIORITIES[state.decision.priority],
            traceparent=outgoing_traceparent(state.trace, self.tracing),
        )
        chain = state.chain
        events = self.pools[state.caller.tenant].chain(chain[0], chain[1:]).generate(request)
        return _first_token_noted(state, events) if self.note_first_token else events

    def cost(self, state: RequestState, backend: str, usage: Usage) -> float:
        price = self.backends[state.caller.tenant][backend].price
        return (
            usage.prompt_tokens * price.input_per_1k + usage.completion_tokens * price.output_per_1k
        ) / 1000.0

    def breakers(self, state: RequestState) -> dict[str, str]:
        return self.pools[state.caller.tenant].breaker_states(state.chain)

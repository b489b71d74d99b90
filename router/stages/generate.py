"""Generate: the stitched prompt, sent down policy's backend chain, streamed back.

Retries, circuit breakers and fallbacks live in ``router/backends/resilience.py``; this stage
builds the request from the state and prices the answer with the backend that gave it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

from router.backends.resilience import BackendPool, Served
from router.backends.slots import PRIORITIES
from router.backends.types import GenerationEvent, GenerationRequest, Message, Usage
from router.config import BackendConfig
from router.pipeline import RequestState


class Generate:
    name = "generate"

    def __init__(
        self,
        pools: Mapping[str, BackendPool],
        backends: Mapping[str, Mapping[str, BackendConfig]],
    ):
        self.pools = pools
        self.backends = backends

    def stream(self, state: RequestState) -> AsyncGenerator[GenerationEvent | Served, None]:
        assert state.context is not None and state.limits is not None and state.decision
        request = GenerationRequest(
            messages=(*state.history, Message("user", state.context.assembly.prompt)),
            max_tokens=state.limits.max_tokens,
            temperature=state.limits.temperature,
            deadline=state.deadline,
            request_id=state.query.request_id,
            metadata={"tenant": state.caller.tenant, "route": state.decision.route},
            priority=PRIORITIES[state.decision.priority],
        )
        chain = state.chain
        return self.pools[state.caller.tenant].chain(chain[0], chain[1:]).generate(request)

    def cost(self, state: RequestState, backend: str, usage: Usage) -> float:
        price = self.backends[state.caller.tenant][backend].price
        return (
            usage.prompt_tokens * price.input_per_1k + usage.completion_tokens * price.output_per_1k
        ) / 1000.0

    def breakers(self, state: RequestState) -> dict[str, str]:
        return self.pools[state.caller.tenant].breaker_states(state.chain)

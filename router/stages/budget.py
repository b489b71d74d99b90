"""Budget: right before the backend is called, take the tokens from the token rate limits and
reserve the budgets (``router/policy/limits.py``); when the answer ends, however it ends,
settle them with what it used or give them back.

It runs after stitch, so the prompt is known, and before Orchestrate's first event, so a
request the budgets cannot cover is a RESOURCE_EXHAUSTED status and never starts a stream.
"""

from __future__ import annotations

from router.pipeline import RequestState
from router.policy.limits import Limits


def prompt_token_estimate(prompt: str) -> int:
    """Tokens a prompt may cost at a backend, erring high: a UTF-8 byte count over 3 (English
    runs at about 4 bytes a token in the usual BPE vocabularies, and a word-counting backend
    counts fewer). What the backend reports settles the budget."""
    return len(prompt.encode("utf-8", "surrogatepass")) // 3 + 1


class Budget:
    name = "budget"

    def __init__(self, limits: Limits):
        self.limits = limits

    async def run(self, state: RequestState) -> None:
        if not state.generates or state.context is None or state.limits is None:
            return
        await self.limits.reserve(state, prompt_token_estimate(state.context.assembly.prompt))

    async def settle(self, state: RequestState) -> None:
        await self.limits.settle(state)

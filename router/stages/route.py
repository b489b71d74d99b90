"""Route: the decision, from the tenant's active routing model.

When the model uses the sentence encoder, the text is encoded first by the micro-batching
encoder (off the event loop) and the embedding is kept in the state, so stitch reuses it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np

from router.context.batching import BatchingEncoder
from router.pipeline import RequestState
from router.routing.decider import Deciders


async def encode_text(batcher: BatchingEncoder, state: RequestState, stage: str) -> np.ndarray:
    """The state's text embedding ``[1, dim]``, timed as ``STAGE.encode``; kept in the state."""
    started = time.perf_counter_ns()
    embedding = (await batcher.encode(state.text)).reshape(1, -1)
    state.timings_us[f"{stage}.encode"] = (time.perf_counter_ns() - started) // 1000
    state.embedding = embedding
    return embedding


class Route:
    name = "route"

    def __init__(self, deciders: Deciders, batcher: BatchingEncoder, executor: Executor):
        self.deciders = deciders
        self.batcher = batcher
        self.executor = executor

    async def run(self, state: RequestState) -> None:
        tenant = self.deciders.tenant(state.caller)
        embedding = state.embedding  # a guard may have encoded the text already
        if embedding is None and tenant.uses_encoder:
            embedding = await encode_text(self.batcher, state, self.name)
        decision = tenant.decide(state.query.app, state.text, embedding)
        decision.request_id = state.query.request_id
        decision.extracted = state.extracted
        state.decision = decision

    async def run_many(self, states: Sequence[RequestState]) -> None:
        """One model call for the whole batch, in the bounded executor (a batch is big work)."""
        if not states:
            return
        tenant = self.deciders.tenant(states[0].caller)
        apps = [s.query.app for s in states]
        texts = [s.text for s in states]
        work = asyncio.get_running_loop().run_in_executor(
            self.executor, tenant.decide_many, apps, texts
        )
        decisions = await asyncio.wait_for(work, states[0].remaining())
        for state, decision in zip(states, decisions, strict=True):
            decision.request_id = state.query.request_id
            decision.extracted = state.extracted
            state.decision = decision

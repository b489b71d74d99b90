"""Stitch: the decided route's context, gathered and assembled into a cited prompt.

The question is encoded only when the route retrieves from a collection and the route stage
has not already encoded it; gathering and assembly run in the bounded executor when the route
searches a collection, queries a SQL mirror or was sent packets, so the event loop only
coordinates; a route with only the question and configured text is assembled on the loop,
sparing the hand-off.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import Executor

from router.context.batching import BatchingEncoder
from router.context.stitch import ContextSources
from router.pipeline import RequestState
from router.stages.route import encode_text


class Stitch:
    name = "stitch"

    def __init__(self, sources: ContextSources, batcher: BatchingEncoder, executor: Executor):
        self.sources = sources
        self.batcher = batcher
        self.executor = executor

    async def run(self, state: RequestState) -> None:
        decision = state.decision
        assert decision is not None, "stitch runs after route"
        stitcher = self.sources.tenants[state.caller.tenant]
        embedding = state.embedding
        if embedding is None and stitcher.uses_encoder(decision.route):
            embedding = await encode_text(self.batcher, state, self.name)
        stitch = functools.partial(
            stitcher.stitch,
            state.query.app,
            state.text,
            state.metadata,
            decision,
            embedding=embedding,
            packets=state.packets,
            budget_tokens=state.budget_tokens,
        )
        if state.packets or stitcher.blocks(decision.route):
            work = asyncio.get_running_loop().run_in_executor(self.executor, stitch)
            result = await asyncio.wait_for(work, state.remaining())
        else:  # only the question and configured text: no hand-off to a thread
            result = stitch()
        state.timings_us.update(result.timings_us)
        state.context = result

"""Micro-batched encoding off the event loop.

Texts are encoded in a bounded executor, never on the event loop. While an encoder call is
running, new requests wait and are then encoded together in one call; a request that finds the
encoder idle starts at once (together with anything that arrived in the same loop iteration).
So a lone request pays no batching delay, and a burst costs a few encoder calls, not one each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from router.routing.encoder import Encoder


class BatchingEncoder:
    """``await encode(text)``; ``encoder`` may be a factory, called on first use (off the loop)."""

    def __init__(
        self,
        encoder: Encoder | Callable[[], Encoder],
        executor: Executor,
        max_batch: int = 32,
    ):
        self._encoder = encoder
        self.executor = executor
        self.max_batch = max_batch
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._scheduled = False
        self._running = 0
        self.batches = 0  # how many encoder calls were made (observable in tests)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        if callable(self._encoder) and not hasattr(self._encoder, "encode"):
            self._encoder = self._encoder()
        return self._encoder.encode(texts)

    async def encode(self, text: str) -> np.ndarray:
        """The text's embedding, ``float32[dim]``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((text, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._running == 0 and not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        batch = [(text, future) for text, future in batch if not future.cancelled()]
        if not batch:
            return
        self.batches += 1
        self._running += 1
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self.executor, self._encode_batch, [t for t, _ in batch])

        def deliver(done: asyncio.Future[np.ndarray]) -> None:
            self._running -= 1
            error = done.exception()
            for i, (_, future) in enumerate(batch):
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(done.result()[i])
            if self._pending and self._running == 0:
                self._flush()

        work.add_done_callback(deliver)

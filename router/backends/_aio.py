"""A small async helper shared by the backends."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

T = TypeVar("T")


@asynccontextmanager
async def closing(events: AsyncIterator[T]) -> AsyncGenerator[AsyncIterator[T], None]:
    """Like ``contextlib.aclosing`` for any async iterator: an async generator left early is
    closed here and now (its ``finally`` blocks release connections and slots), not whenever
    the garbage collector gets to it."""
    try:
        yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()

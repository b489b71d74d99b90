"""A busy backend's slots go to waiting calls by priority, then arrival; none leak."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from router.backends.slots import PRIORITIES, PrioritySlots


async def test_waiters_are_let_in_by_priority_then_arrival():
    slots = PrioritySlots(1)
    await slots.acquire()
    order: list[str] = []

    async def wait(name: str, priority: str) -> None:
        await slots.acquire(PRIORITIES[priority])
        order.append(name)
        await asyncio.sleep(0)
        slots.release()

    tasks = [
        asyncio.create_task(wait(name, priority))
        for name, priority in [("low-1", "low"), ("normal-1", "normal"), ("high-1", "high"),
                               ("normal-2", "normal"), ("high-2", "high")]
    ]  # fmt: skip
    await asyncio.sleep(0)
    assert slots.waiting == 5
    slots.release()
    await asyncio.gather(*tasks)
    assert order == ["high-1", "high-2", "normal-1", "normal-2", "low-1"]
    assert slots._free == 1 and slots.waiting == 0


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(1, 3),
    calls=st.lists(st.tuples(st.integers(0, 2), st.booleans()), min_size=1, max_size=12),
)
def test_cancelled_waiters_never_hold_or_leak_a_slot(limit, calls):
    async def scenario() -> None:
        slots = PrioritySlots(limit)
        holding = 0
        most = 0

        async def call(priority: int) -> None:
            nonlocal holding, most
            await slots.acquire(priority)
            holding += 1
            most = max(most, holding)
            try:
                await asyncio.sleep(0.001)
            finally:
                holding -= 1
                slots.release()

        tasks = [asyncio.create_task(call(p)) for p, _ in calls]
        await asyncio.sleep(0)
        for task, (_, cancel) in zip(tasks, calls, strict=True):
            if cancel:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert most <= limit and holding == 0
        assert slots._free == limit and slots.waiting == 0

    asyncio.run(scenario())

"""Guard-out helpers: watching an answer in flight, with a hold-back window.

An output guard's ``watch(state)`` returns an ``OutputWatch`` for one answer. ``HeldWindow`` is
the common shape: it keeps the last ``window`` characters of the answer back from the caller,
so a pattern split across deltas (a card number arriving in three pieces) is seen whole before
any of it is released, and hands the whole held text to ``review`` each time, which may return
it changed (redacted, restored) or raise ``OutputBlocked``.
"""

from __future__ import annotations

from collections.abc import Callable


class HeldWindow:
    """An ``OutputWatch`` that releases all but the last ``window`` characters it was fed."""

    def __init__(self, window: int, review: Callable[[str], str]):
        if window < 0:
            raise ValueError("window must be >= 0")
        self.window = window
        self.review = review
        self.held = ""

    def feed(self, text: str) -> str:
        held = self.review(self.held + text)
        cut = max(len(held) - self.window, 0)
        self.held = held[cut:]
        return held[:cut]

    def flush(self) -> str:
        held = self.review(self.held) if self.held else ""
        self.held = ""
        return held

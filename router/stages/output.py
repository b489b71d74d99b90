"""Guard-out helpers: watching an answer in flight, with a hold-back window.

An output guard's ``watch(state)`` returns an ``OutputWatch`` for one answer. ``HeldWindow`` is
the common shape: it keeps the last ``window`` characters of the answer back from the caller,
so a pattern split across deltas (a card number arriving in three pieces) is seen whole before
any of it is released, and hands the whole held text to ``review(text, final)`` each time
(``final`` once the answer is complete), which may return it changed (redacted, restored),
raise ``OutputBlocked`` (the stream ends with a BLOCKED event) or raise ``ReplaceAnswer`` (the
replacement is released instead of the held text and the rest of the answer is dropped).
"""

from __future__ import annotations

from collections.abc import Callable

Review = Callable[[str, bool], str]


class ReplaceAnswer(Exception):  # noqa: N818 - a control signal, not an error
    """Raised by a review: release ``replacement`` instead, and nothing more of this answer."""

    def __init__(self, replacement: str):
        super().__init__("the answer is replaced")
        self.replacement = replacement


class HeldWindow:
    """An ``OutputWatch`` that releases all but the last ``window`` characters it was fed.

    ``window=None`` holds the whole answer until it is complete.
    """

    def __init__(self, window: int | None, review: Review):
        if window is not None and window < 0:
            raise ValueError("window must be >= 0")
        self.window = window
        self.review = review
        self.held = ""
        self.replaced = False

    def _reviewed(self, text: str, final: bool) -> str | None:
        try:
            return self.review(text, final)
        except ReplaceAnswer as replace:
            self.replaced, self.held = True, ""
            return replace.replacement

    def feed(self, text: str) -> str:
        if self.replaced:
            return ""
        held = self.held + text
        if self.window is None:
            self.held = held
            return ""
        reviewed = self._reviewed(held, False)
        if self.replaced:
            return reviewed or ""
        assert reviewed is not None
        cut = max(len(reviewed) - self.window, 0)
        self.held = reviewed[cut:]
        return reviewed[:cut]

    def flush(self) -> str:
        if self.replaced:
            return ""
        held, self.held = self.held, ""
        return self._reviewed(held, True) or ""

"""Guard-out: the answer restored and checked in flight, before the caller sees it.

``RestorePlaceholders`` puts the caller's values back where guard-in put placeholders, even
when a placeholder arrives split over several deltas (it holds back one placeholder's length).
``OutputChecks`` runs the tenant's rules for the route over a held-back window of the answer:

* ``deny``: an RE2 pattern the answer must not contain;
* ``commitment``: amounts or percentages the answer promises, over a limit (``max``, or the
  request metadata key ``max_from_metadata``: "a refund above 200 needs a human");
* ``grounding``: every number in the answer (prices, hours, quantities, ids) must appear in
  the stitched context or the question, a cheap check against invented facts;
* ``citations``: an answer built on context must cite it (``[n]``);
* ``json_schema``: the whole answer must be JSON valid under the schema (such routes hold the
  whole answer);
* ``pii_leak``: PII in the answer that the caller did not supply;
* ``max_length``: the answer's length in characters.

Actions: ``block`` (an error event, nothing more is streamed), ``redact`` (the span is masked in
flight; for ``max_length`` the answer is cut), ``replace`` (the configured safe answer instead of
the rest) and ``flag`` (passed on and recorded). Every violation is a finding (once per rule and
matched text), never with the matched value.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable

from router.governance.rules import (
    Governance,
    OutputRule,
    OutputRules,
    merge_spans,
    structured_scanner,
)
from router.pipeline import Finding, OutputBlocked, RequestState
from router.stages.output import HeldWindow, ReplaceAnswer
from router.stages.prep import _BUILT_IN as BUILT_IN_PATTERNS

AMOUNT = BUILT_IN_PATTERNS["amount"]
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:]\d+)*(?![\w])")
PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s?%")
REDACTED = "[redacted]"


class RestorePlaceholders:
    name = "restore"

    def watch(self, state: RequestState) -> HeldWindow | None:
        placeholders = dict(state.placeholders)
        if not placeholders:
            return None
        longest = max(len(p) for p in placeholders)

        def restore(text: str, _final: bool) -> str:
            if "<" not in text:
                return text
            for placeholder, value in placeholders.items():
                text = text.replace(placeholder, value)
            return text

        # Hold back a placeholder's length less one: a partial placeholder is never released.
        return HeldWindow(longest - 1, restore)


def _number(token: str) -> str:
    return token.replace(",", "")


class _Review:
    """One answer's checks: ``__call__(held_text, final) -> text to keep``."""

    def __init__(self, name: str, state: RequestState, output: OutputRules, rules: tuple):
        self.name = name
        self.state = state
        self.output = output
        self.rules: tuple[OutputRule, ...] = rules
        self.seen: set[tuple[int, str]] = set()
        self.length = 0  # characters reviewed and released before the held text
        context = state.context
        sources = state.text + " " + (context.assembly.prompt if context else "")
        self.grounded = {_number(m.group(0)) for m in NUMBER.finditer(sources)}
        self.supplied = set(state.placeholders.values()) | {state.query.text}
        self.cited = False

    def _violation(self, index: int, rule: OutputRule, matched: str, detail: str) -> str:
        """Record the finding once; return the action (raising for block and replace)."""
        action = rule.config.action
        key = (index, matched)
        if key not in self.seen:
            self.seen.add(key)
            self.state.findings.append(Finding(self.name, rule.config.kind, detail, action=action))
        if action == "block":
            raise OutputBlocked(f"the answer broke the {rule.config.kind} rule ({detail})")
        if action == "replace":
            raise ReplaceAnswer(self.output.replacement)
        return action

    def _complete(self, end: int, text: str, final: bool) -> bool:
        """A match touching the end of the held text may still grow: judge it later."""
        return final or end < len(text)

    def __call__(self, text: str, final: bool) -> str:
        for index, rule in enumerate(self.rules):
            check: Callable[[int, OutputRule, str, bool], str] = getattr(
                self, f"_{rule.config.kind}"
            )
            text = check(index, rule, text, final)
        return text

    def _deny(self, index: int, rule: OutputRule, text: str, final: bool) -> str:
        for match in list(rule.pattern.finditer(text)):
            if self._violation(index, rule, match.group(0), "a denied pattern") == "redact":
                text = text.replace(match.group(0), REDACTED)
        return text

    def _commitment(self, index: int, rule: OutputRule, text: str, final: bool) -> str:
        limit = rule.config.max
        if rule.config.max_from_metadata:
            # No usable limit in this request: the configured one (if any) holds.
            with contextlib.suppress(KeyError, ValueError):
                limit = float(self.state.metadata[rule.config.max_from_metadata])
        if limit is None:
            return text
        pattern = AMOUNT if rule.config.what == "amount" else PERCENT
        for match in list(pattern.finditer(text)):
            if not self._complete(match.end(), text, final):
                continue
            groups = [g for g in match.groups() if g]
            try:
                value = float(groups[0].replace(",", "")) if groups else None
            except ValueError:
                continue
            if value is not None and value > limit:
                detail = f"{rule.config.what} over {limit:g}"
                if self._violation(index, rule, match.group(0), detail) == "redact":
                    text = text.replace(match.group(0), REDACTED)
        return text

    def _grounding(self, index: int, rule: OutputRule, text: str, final: bool) -> str:
        for match in list(NUMBER.finditer(text)):
            token = match.group(0)
            if not self._complete(match.end(), text, final) or _number(token) in self.grounded:
                continue
            if self._violation(index, rule, token, "a number not in the context") == "redact":
                text = text.replace(token, REDACTED)
        return text

    def _citations(self, index: int, rule: OutputRule, text: str, final: bool) -> str:
        context = self.state.context
        if context is None or not context.assembly.placed:
            return text
        self.cited = self.cited or any(f"[{p.number}]" in text for p in context.assembly.placed)
        if final and not self.cited:
            self._violation(index, rule, "", "no citation of the context")
        return text

    def _json_schema(self, index: int, rule: OutputRule, text: str, final: bool) -> str:
        if not final:
            return text
        try:
            assert rule.validate is not None
            rule.validate(json.loads(text))
        except Exception as exc:  # noqa: BLE001 - JSON or schema error: both are a violation
            reason = getattr(exc, "message", None) or type(exc).__name__
            self._violation(index, rule, "", f"not valid under the route's schema: {reason}")
        return text

    def _pii_leak(self, index: int, rule: OutputRule, text: str, final: bool) -> str:
        spans = merge_spans(structured_scanner().scan(text))
        for span in reversed(spans):
            value = text[span.start : span.end]
            if not self._complete(span.end, text, final):
                continue
            if any(value in supplied for supplied in self.supplied):
                continue  # the caller's own value, handed back
            detail = f"{span.kind} the caller did not give"
            if self._violation(index, rule, value, detail) == "redact":
                text = text[: span.start] + f"[{span.kind}]" + text[span.end :]
        return text

    def _max_length(self, index: int, rule: OutputRule, text: str, final: bool) -> str:
        assert rule.config.max_chars is not None
        if self.length + len(text) <= rule.config.max_chars:
            return text
        self._violation(index, rule, "", f"longer than {rule.config.max_chars} characters")
        if rule.config.action == "redact":
            return text[: max(rule.config.max_chars - self.length, 0)]
        return text


class _CountingWindow(HeldWindow):
    """A HeldWindow that tells its review how much it has released (for max_length)."""

    def __init__(self, window: int | None, review: _Review):
        super().__init__(window, review)
        self.counted = review

    def feed(self, text: str) -> str:
        released = super().feed(text)
        self.counted.length += len(released)
        return released


class OutputChecks:
    name = "output_rules"

    def __init__(self, governance: Governance):
        self.governance = governance

    def watch(self, state: RequestState) -> HeldWindow | None:
        output = self.governance.of(state.caller.tenant).output
        route = state.decision.route if state.decision else ""
        rules = output.for_route(route) if output else ()
        if not rules or output is None:
            return None
        return _CountingWindow(output.window_for(rules), _Review(self.name, state, output, rules))

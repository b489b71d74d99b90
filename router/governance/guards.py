"""Guard-in: PII redaction, the injection guard, and per-app refusal of abstained intents.

``PiiRedaction`` rewrites ``state.text`` before anything else sees it. Per entity type the
tenant chooses ``redact`` (typed, numbered placeholders such as ``<CARD_1>``, the same value
getting the same placeholder within a request; the placeholder -> value map lives only in
``state.placeholders`` so the answer can be restored), ``mask`` (irreversible: all but the last
four characters of identifiers become ``*``), ``allow`` (the value stays; the backend then needs
the type's certification) or ``block`` (the request is refused, naming the types, never the
values). A placeholder the caller wrote is never one Plexus restores: new placeholders skip
every number already present in the text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from router.backends.types import Message
from router.context.batching import BatchingEncoder
from router.errors import PermissionDenied
from router.governance.rules import Governance, PiiRules
from router.governance.types import Span
from router.pipeline import Finding, RequestState
from router.stages.route import encode_text

PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)_(\d+)>")
_KEEP_TAIL = {"CARD", "IBAN", "PHONE", "SSN"}


def _mask(kind: str, value: str) -> str:
    if kind in _KEEP_TAIL and len(value) > 4:
        return "".join("*" if ch.isalnum() else ch for ch in value[:-4]) + value[-4:]
    return f"[{kind}]"


def redact(
    text: str, spans: Sequence[Span], rules: PiiRules, known: Mapping[str, str] | None = None
) -> tuple[str, dict[str, str]]:
    """``text`` with every redacted or masked span replaced; the new placeholder -> value map.

    ``known``: placeholders already given out in this request (another message of the same
    conversation): a value keeps its placeholder, and new numbers come after them."""
    taken = {(m.group(1), int(m.group(2))) for m in PLACEHOLDER.finditer(text)}
    placeholders: dict[str, str] = {}
    by_value: dict[tuple[str, str], str] = {}
    counters: dict[str, int] = {}
    for placeholder, value in (known or {}).items():
        match = PLACEHOLDER.fullmatch(placeholder)
        if match is not None:
            kind, number = match.group(1), int(match.group(2))
            by_value[(kind, value)] = placeholder
            counters[kind] = max(counters.get(kind, 0), number)
    parts: list[str] = []
    at = 0
    for span in spans:
        action = rules.action(span.kind)
        if action not in ("redact", "mask"):
            continue
        value = text[span.start : span.end]
        if action == "mask":
            replacement = _mask(span.kind, value)
        elif (span.kind, value) in by_value:
            replacement = by_value[(span.kind, value)]
        else:
            number = counters.get(span.kind, 0) + 1
            while (span.kind, number) in taken:
                number += 1
            counters[span.kind] = number
            replacement = f"<{span.kind}_{number}>"
            by_value[(span.kind, value)] = replacement
            placeholders[replacement] = value
        parts += [text[at : span.start], replacement]
        at = span.end
    parts.append(text[at:])
    return "".join(parts), placeholders


class PiiRedaction:
    name = "pii"

    def __init__(self, governance: Governance):
        self.governance = governance

    async def run(self, state: RequestState) -> None:
        rules = self.governance.of(state.caller.tenant).pii
        if rules is None:
            return
        state.text = self._redacted(state, rules, state.text, "")
        if state.history:
            state.history = tuple(
                Message(m.role, self._redacted(state, rules, m.content, f"history.{i}"))
                for i, m in enumerate(state.history)
            )

    def _redacted(self, state: RequestState, rules: PiiRules, text: str, where: str) -> str:
        """``text`` as the backends may see it (``where``: empty for the request's text, else
        which earlier message, in the findings' detail)."""
        spans = rules.detect(text)
        if not spans:
            return text
        blocked: list[str] = []
        for span in spans:
            action = rules.action(span.kind)
            state.findings.append(
                Finding(self.name, span.kind, where, span.start, span.end, action, span.score)
            )
            if action == "block":
                blocked.append(span.kind)
            elif action == "allow":
                state.raw_data.add(span.kind)
        if blocked:
            raise PermissionDenied(
                f"the request contains {', '.join(sorted(set(blocked)))}, which this tenant "
                "does not accept; remove it and try again"
            )
        text, placeholders = redact(text, spans, rules, state.placeholders)
        state.placeholders.update(placeholders)
        return text


class InjectionCheck:
    """Refuses (or flags) a request the tenant's guard model scores as a prompt injection."""

    name = "injection"

    def __init__(self, governance: Governance, batcher: BatchingEncoder):
        self.governance = governance
        self.batcher = batcher

    async def run(self, state: RequestState) -> None:
        rules = self.governance.of(state.caller.tenant).injection
        if rules is None:
            return
        guard = rules.guard()
        embedding = state.embedding
        if guard.uses_encoder and embedding is None:  # encoded off the loop, kept for route
            embedding = await encode_text(self.batcher, state, self.name)
        score = guard.score(state.text, embedding)
        threshold = guard.threshold if rules.threshold is None else rules.threshold
        if score < threshold:
            return
        state.findings.append(
            Finding(self.name, "prompt_injection", guard.version, -1, -1, rules.action, score)
        )
        if rules.action == "block":
            raise PermissionDenied("the request was refused: it reads as a prompt injection")


class AppIntentRules:
    """After route: an app may refuse requests whose intent the model could not place."""

    name = "app_rules"

    def __init__(self, governance: Governance):
        self.governance = governance

    async def run(self, state: RequestState) -> None:
        rules = self.governance.of(state.caller.tenant).apps.get(state.query.app)
        decision = state.decision
        if rules is None or decision is None or not rules.refuse_abstained:
            return
        if decision.abstained:
            state.findings.append(
                Finding(self.name, "abstained_intent", decision.route, -1, -1, "block")
            )
            raise PermissionDenied(rules.message)

"""Each tenant's governance rules, compiled once from its configuration and swapped whole.

``Governance`` holds the compiled rules of every tenant; ``swap(tenant, rules)`` replaces one
tenant's rules in a single assignment, so a request reads one consistent set (stages read
``governance.of(tenant)`` once) while a reload builds the next. Detectors that load models (the
entity tagger, injection guards) are shared between tenants and built only when a tenant uses
them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.config import (
    GovernanceConfig,
    LoadedConfig,
    OutputRuleConfig,
    compile_re2,
)
from router.governance.types import Span

if TYPE_CHECKING:
    from router.governance.injection import InjectionGuard
    from router.governance.ner import EntityTagger
    from router.governance.pii_scan import PiiScanner

DEFAULT_CERTIFICATION = "pii"


@cache
def structured_scanner() -> PiiScanner:
    from router.governance.pii_scan import PiiScanner

    return PiiScanner()


@cache
def default_tagger() -> EntityTagger:
    from router.governance.ner import EntityTagger

    return EntityTagger.default()


@cache
def injection_guard(path: Path | None) -> InjectionGuard:
    from router.governance.injection import InjectionGuard

    return InjectionGuard.default() if path is None else InjectionGuard.from_file(path)


def merge_spans(spans: list[Span], learned: Sequence[Span] = ()) -> list[Span]:
    """Non-overlapping spans by start.

    Of overlapping ``spans`` (structural matches) the longer wins, then the surer. A
    ``learned`` span (the tagger's) never takes a structural match's place: it keeps only its
    parts outside them, so an address that holds a phone number becomes the phone number plus
    the address text around it (when a learned ADDRESS swallowed them, 12 phone numbers and 4
    card numbers of the PII benchmark set lost their type).
    """
    chosen: list[Span] = []
    for span in sorted(spans, key=lambda s: (-(s.end - s.start), -s.score, s.start)):
        if all(span.end <= kept.start or span.start >= kept.end for kept in chosen):
            chosen.append(span)
    structural = sorted(chosen, key=lambda s: s.start)
    for span in sorted(learned, key=lambda s: (-(s.end - s.start), -s.score, s.start)):
        for part in _outside(span, structural):
            if all(part.end <= kept.start or part.start >= kept.end for kept in chosen):
                chosen.append(part)
    return sorted(chosen, key=lambda s: s.start)


MIN_LEARNED_PART = 3
"""A learned span's part shorter than this (a stray comma between two numbers) is dropped."""


def _outside(span: Span, structural: Sequence[Span]) -> list[Span]:
    """The parts of ``span`` that no structural span covers."""
    parts: list[Span] = []
    start = span.start
    for other in structural:
        if other.end <= start or other.start >= span.end:
            continue
        if other.start > start:
            parts.append(Span(span.kind, start, other.start, span.score))
        start = max(start, other.end)
    if start < span.end:
        parts.append(Span(span.kind, start, span.end, span.score))
    return [p for p in parts if p.end - p.start >= MIN_LEARNED_PART]


@dataclass(frozen=True)
class PiiRules:
    actions: Mapping[str, str]
    default_action: str
    identifiers: tuple[tuple[str, Any, str], ...]  # (kind, compiled RE2, action)
    learned: bool
    min_score: float
    certifications: Mapping[str, str]
    uncertified: str

    def action(self, kind: str) -> str:
        return self.actions.get(kind, self.default_action)

    def certification(self, kind: str) -> str:
        return self.certifications.get(kind, DEFAULT_CERTIFICATION)

    def detect(self, text: str) -> list[Span]:
        """Every PII span of ``text``: structured, tenant identifiers and (if on) learned."""
        spans = list(structured_scanner().scan(text))
        for kind, pattern, _action in self.identifiers:
            spans += [Span(kind, m.start(), m.end(), 1.0) for m in pattern.finditer(text)]
        learned = []
        if self.learned:
            learned = [s for s in default_tagger().tag(text) if s.score >= self.min_score]
        return merge_spans([s for s in spans if s.end > s.start], learned)


@dataclass(frozen=True)
class InjectionRules:
    action: str
    threshold: float | None  # None: the model's own
    model: Path | None

    def guard(self) -> InjectionGuard:
        return injection_guard(self.model)


@dataclass(frozen=True)
class OutputRule:
    config: OutputRuleConfig
    pattern: Any = None  # deny: compiled RE2
    validate: Callable[[Any], Any] | None = None  # json_schema: compiled validator

    def applies(self, route: str) -> bool:
        return self.config.routes is None or route in self.config.routes


@dataclass(frozen=True)
class OutputRules:
    window: int | None  # None: hold the whole answer
    replacement: str
    rules: tuple[OutputRule, ...]

    def for_route(self, route: str) -> tuple[OutputRule, ...]:
        return tuple(rule for rule in self.rules if rule.applies(route))

    def window_for(self, rules: tuple[OutputRule, ...]) -> int | None:
        """A JSON schema can only be checked whole: its routes hold the whole answer."""
        if any(rule.config.kind == "json_schema" for rule in rules):
            return None
        return self.window


@dataclass(frozen=True)
class TenantGovernance:
    pii: PiiRules | None = None
    injection: InjectionRules | None = None
    apps: Mapping[str, Any] = field(default_factory=dict)
    output: OutputRules | None = None


def compile_rules(config: GovernanceConfig, loaded: LoadedConfig) -> TenantGovernance:
    """A tenant's rules ready for the request path (patterns and schemas compiled here)."""
    pii = None
    if config.pii is not None:
        pii = PiiRules(
            actions=dict(config.pii.actions),
            default_action=config.pii.default_action,
            identifiers=tuple(
                (i.name, compile_re2(i.pattern), i.action) for i in config.pii.identifiers
            ),
            learned=config.pii.learned,
            min_score=config.pii.min_score,
            certifications=dict(config.pii.certifications),
            uncertified=config.pii.uncertified,
        )
    injection = None
    if config.injection is not None:
        threshold = config.injection.threshold
        model = config.injection.model
        injection = InjectionRules(
            action=config.injection.action,
            threshold=None if threshold == "model" else float(threshold),
            model=None if model is None else loaded.resolve(model),
        )
    output = None
    if config.output is not None:
        rules = []
        for rule in config.output.rules:
            pattern = compile_re2(rule.pattern) if rule.pattern else None
            validate = None
            if rule.json_schema is not None:
                import fastjsonschema

                validate = fastjsonschema.compile(rule.json_schema)
            rules.append(OutputRule(rule, pattern, validate))
        window = config.output.window
        output = OutputRules(
            window=None if window == "all" else int(window),
            replacement=config.output.replacement,
            rules=tuple(rules),
        )
    return TenantGovernance(pii, injection, dict(config.apps), output)


class Governance:
    """Every tenant's compiled rules; ``of(tenant)`` is what a request reads, once."""

    def __init__(self, loaded: LoadedConfig):
        self.rules: dict[str, TenantGovernance] = {
            name: compile_rules(tenant.governance, loaded)
            for name, tenant in loaded.config.tenants.items()
        }

    def of(self, tenant: str) -> TenantGovernance:
        return self.rules.get(tenant, _NONE)

    def swap(self, tenant: str, rules: TenantGovernance) -> None:
        self.rules = {**self.rules, tenant: rules}

    def warm(self) -> None:
        """Load the detectors some tenant uses now, not on its first request."""
        for rules in self.rules.values():
            warm(rules)


def warm(rules: TenantGovernance) -> None:
    """Load (once per process) and run the detectors ``rules`` use."""
    if rules.pii is not None:
        structured_scanner().scan("warm up 4111 1111 1111 1111")
        if rules.pii.learned:
            default_tagger().tag("My name is Ada Lovelace.")
    if rules.injection is not None:
        rules.injection.guard().score("warm up")


_NONE = TenantGovernance()

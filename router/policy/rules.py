"""Policy rules: a tenant's ordered list, compiled once at load into a matcher.

A rule matches on the caller (app, key name), request metadata (tier, region, channel...), the
decision (route, confidence, abstained) and the governance findings so far, and acts: it
chooses or reorders the backend chain, caps ``max_tokens``, sets the context budget, denies the
request, escalates it to another route (a human hand-off), or sets a priority.

The first rule that matches applies and ends the evaluation, unless it says ``continue``: then
the next matching rules apply too. When several applied rules set the same action, the first
one's value holds, except the caps (``max_tokens``, ``context_budget_tokens``), where the
smallest holds. ``deny`` ends the evaluation wherever it appears.

Compilation turns every condition into frozensets and bounds, and indexes the rules by the
route they can match, so a request only looks at the rules that could apply to its route: no
parsing and no scanning of unrelated rules per request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from router.config import PolicyRuleConfig

ANY_VALUE = "*"


@dataclass(slots=True)
class PolicyFacts:
    """What a rule can look at: the caller, the request's metadata, the decision, the findings."""

    app: str
    key: str
    metadata: Mapping[str, str]
    route: str
    confidence: float
    abstained: bool
    findings: frozenset[str]


@dataclass
class PolicyOutcome:
    """What the applied rules decided; None where no applied rule said anything."""

    applied: list[str] = field(default_factory=list)
    chain: tuple[str, ...] | None = None
    max_tokens: int | None = None
    context_budget_tokens: int | None = None
    deny: str | None = None
    denied_by: str | None = None
    escalate_to: str | None = None
    priority: str | None = None


@dataclass(frozen=True)
class RuleTrace:
    """One rule's verdict for ``explain``: whether it matched and, if not, the first reason."""

    name: str
    matched: bool
    applied: bool
    reason: str


class CompiledRule:
    """One rule, its conditions as sets and bounds (None: no condition)."""

    __slots__ = (
        "name",
        "apps",
        "keys",
        "routes",
        "metadata",
        "min_confidence",
        "max_confidence",
        "abstained",
        "findings",
        "then",
        "keep_going",
    )

    def __init__(self, config: PolicyRuleConfig):
        when = config.when
        self.name = config.name
        self.apps = frozenset(when.apps) or None
        self.keys = frozenset(when.keys) or None
        self.routes = frozenset(when.routes) or None
        self.metadata = tuple(
            (key, None if ANY_VALUE in values else frozenset(values))
            for key, values in sorted(when.metadata.items())
        )
        self.min_confidence = when.min_confidence
        self.max_confidence = when.max_confidence
        self.abstained = when.abstained
        self.findings = frozenset(when.findings) or None
        self.then = config.then
        self.keep_going = config.keep_going

    def matches(self, facts: PolicyFacts) -> bool:
        """Whether every condition holds (the request path: no reasons, no formatting)."""
        if self.apps is not None and facts.app not in self.apps:
            return False
        if self.keys is not None and facts.key not in self.keys:
            return False
        if self.routes is not None and facts.route not in self.routes:
            return False
        if self.metadata:
            metadata = facts.metadata
            for key, allowed in self.metadata:
                value = metadata.get(key)
                if value is None or (allowed is not None and value not in allowed):
                    return False
        if self.min_confidence is not None and facts.confidence < self.min_confidence:
            return False
        if self.max_confidence is not None and facts.confidence > self.max_confidence:
            return False
        if self.abstained is not None and facts.abstained != self.abstained:
            return False
        return self.findings is None or not self.findings.isdisjoint(facts.findings)

    def mismatch(self, facts: PolicyFacts) -> str | None:
        """Why the rule does not match (the first failing condition), or None when it does."""
        if self.apps is not None and facts.app not in self.apps:
            return f"app {facts.app!r} is not one of {sorted(self.apps)}"
        if self.keys is not None and facts.key not in self.keys:
            return f"key {facts.key!r} is not one of {sorted(self.keys)}"
        if self.routes is not None and facts.route not in self.routes:
            return f"route {facts.route!r} is not one of {sorted(self.routes)}"
        for key, allowed in self.metadata:
            value = facts.metadata.get(key)
            if value is None:
                return f"metadata {key!r} is not set"
            if allowed is not None and value not in allowed:
                return f"metadata {key}={value!r} is not one of {sorted(allowed)}"
        if self.min_confidence is not None and facts.confidence < self.min_confidence:
            return f"confidence {facts.confidence:.3f} < {self.min_confidence}"
        if self.max_confidence is not None and facts.confidence > self.max_confidence:
            return f"confidence {facts.confidence:.3f} > {self.max_confidence}"
        if self.abstained is not None and facts.abstained != self.abstained:
            return f"abstained is {facts.abstained}"
        if self.findings is not None and not self.findings & facts.findings:
            return f"no finding of the kinds {sorted(self.findings)}"
        return None


def _apply(rule: CompiledRule, outcome: PolicyOutcome) -> None:
    then = rule.then
    outcome.applied.append(rule.name)
    if then.deny is not None:
        outcome.deny, outcome.denied_by = then.deny, rule.name
    if then.chain is not None and outcome.chain is None and outcome.escalate_to is None:
        outcome.chain = tuple(then.chain)
    if then.escalate_to is not None and outcome.escalate_to is None and outcome.chain is None:
        outcome.escalate_to = then.escalate_to
    if then.max_tokens is not None:
        current = outcome.max_tokens
        outcome.max_tokens = then.max_tokens if current is None else min(current, then.max_tokens)
    if then.context_budget_tokens is not None:
        current = outcome.context_budget_tokens
        budget = then.context_budget_tokens
        outcome.context_budget_tokens = budget if current is None else min(current, budget)
    if then.priority is not None and outcome.priority is None:
        outcome.priority = then.priority


class CompiledPolicy:
    """A tenant's rules, indexed by route: ``decide(facts)`` applies them, ``explain`` says why."""

    def __init__(self, rules: Sequence[PolicyRuleConfig], routes: Sequence[str]):
        self.rules = tuple(CompiledRule(rule) for rule in rules)
        self.by_route: dict[str, tuple[CompiledRule, ...]] = {
            route: tuple(r for r in self.rules if r.routes is None or route in r.routes)
            for route in routes
        }

    def __bool__(self) -> bool:
        return bool(self.rules)

    def decide(self, facts: PolicyFacts) -> PolicyOutcome:
        outcome = PolicyOutcome()
        for rule in self.by_route.get(facts.route, ()):
            if rule.matches(facts):
                _apply(rule, outcome)
                if outcome.deny is not None or not rule.keep_going:
                    break
        return outcome

    def explain(self, facts: PolicyFacts) -> tuple[PolicyOutcome, list[RuleTrace]]:
        """The outcome and every rule's verdict, in order (rules after the last one that
        applied are reported as not reached)."""
        outcome = PolicyOutcome()
        traces: list[RuleTrace] = []
        done = False
        for rule in self.rules:
            if done:
                traces.append(RuleTrace(rule.name, False, False, "not reached"))
                continue
            reason = rule.mismatch(facts)
            if reason is not None:
                traces.append(RuleTrace(rule.name, False, False, reason))
                continue
            _apply(rule, outcome)
            done = outcome.deny is not None or not rule.keep_going
            traces.append(
                RuleTrace(rule.name, True, True, "applied, stop" if done else "applied, continue")
            )
        return outcome, traces

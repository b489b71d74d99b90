"""Policy: which backends may answer, in which order, and within which limits.

This stage reads the route's configured chain (``target``, then ``fallbacks``) and the first
backend's limits. Everything a generation needs is checked here, before stitch and before the
first streamed event, so a bad request is a status and never a broken stream.

Certified routing: when guard-in let a kind of PII through as written (action ``allow``), only
backends holding the certification that kind needs (``governance.pii.certifications``, default
``pii``) may receive the prompt. Uncertified backends are skipped (recorded as findings), or
the request is refused with FAILED_PRECONDITION naming the certification, as the tenant chose.
"""

from __future__ import annotations

from collections.abc import Mapping

from router.config import TenantConfig
from router.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from router.governance.rules import Governance
from router.pipeline import Finding, GenerationLimits, RequestState
from router.policy.limits import Limits
from router.policy.rules import CompiledPolicy, PolicyFacts, PolicyOutcome

NO_FINDINGS: frozenset[str] = frozenset()


def policy_facts(state: RequestState) -> PolicyFacts:
    """What the rules see of a request that has been routed."""
    decision = state.decision
    assert decision is not None, "policy runs after route"
    metadata = state.metadata
    tier = state.query.user_tier
    if tier and "tier" not in metadata:
        metadata = {**metadata, "tier": tier}
    return PolicyFacts(
        app=state.query.app,
        key=state.caller.key_name,
        metadata=metadata,
        route=decision.route,
        confidence=decision.confidence,
        abstained=decision.abstained,
        findings=frozenset([f.kind for f in state.findings]) if state.findings else NO_FINDINGS,
    )


class ConfiguredChain:
    name = "policy"

    def __init__(
        self,
        tenants: Mapping[str, TenantConfig],
        governance: Governance,
        limits: Limits | None = None,
    ):
        self.tenants = tenants
        self.governance = governance
        self.limits = limits
        self.chains = {
            name: {route.name: (route.target, *route.fallbacks) for route in tenant.routes}
            for name, tenant in tenants.items()
            if tenant.backends
        }
        self.certified = {
            name: {b: frozenset(c.certifications) for b, c in tenant.backends.items()}
            for name, tenant in tenants.items()
        }
        self.rules = {
            name: CompiledPolicy(tenant.policy.rules, [r.name for r in tenant.routes])
            for name, tenant in tenants.items()
        }

    def swap(self, tenant: str, config: TenantConfig) -> None:
        """Serve ``tenant``'s policy rules and limits from ``config`` from now on (backends and
        routes are the running ones: a reload that changes them is refused before this)."""
        self.rules[tenant] = CompiledPolicy(config.policy.rules, [r.name for r in config.routes])
        if self.limits is not None:
            self.limits.swap(tenant, config)

    async def run(self, state: RequestState) -> None:
        tenant = state.caller.tenant
        rules = self.rules[tenant]
        outcome = self._apply_rules(state, rules.decide(policy_facts(state))) if rules else None
        if self.limits is not None:
            await self.limits.admit(state)
        chains = self.chains.get(tenant)
        assert state.decision is not None, "policy runs after route"
        if chains is None:
            if state.generates:
                raise FailedPrecondition(f"tenant {tenant!r} has no backends configured")
            return
        state.chain = chains[state.decision.route]
        if outcome is not None and outcome.chain is not None:
            state.chain = outcome.chain
        if state.raw_data:
            self._certified_only(state)
        if state.generates:
            first = self.tenants[tenant].backends[state.chain[0]]
            limit = first.max_output_tokens
            if state.max_tokens is not None and state.max_tokens > limit:
                raise InvalidArgument(
                    f"max_tokens {state.max_tokens} exceeds the backend's {limit}"
                )
            max_tokens = state.max_tokens or limit
            if outcome is not None and outcome.max_tokens is not None:
                max_tokens = min(max_tokens, outcome.max_tokens)
            state.limits = GenerationLimits(max_tokens, first.temperature)

    def _apply_rules(self, state: RequestState, outcome: PolicyOutcome) -> PolicyOutcome:
        """Act on what the rules decided, except the chain and the token cap (``run`` does)."""
        decision = state.decision
        assert decision is not None
        state.rules_applied = decision.rules_applied = outcome.applied
        if outcome.deny is not None:
            raise PermissionDenied(f"refused by policy rule {outcome.denied_by!r}: {outcome.deny}")
        if outcome.priority is not None:
            decision.priority = outcome.priority
        if outcome.escalate_to is not None and outcome.escalate_to != decision.route:
            route = self.tenants[state.caller.tenant].route(outcome.escalate_to)
            state.findings.append(
                Finding(self.name, "escalated", f"{decision.route} -> {route.name}", action="route")
            )
            decision.route, decision.target = route.name, route.target
            decision.route_metadata = dict(route.metadata)
        budget = outcome.context_budget_tokens
        if budget is not None and (state.budget_tokens is None or budget < state.budget_tokens):
            context = self.tenants[state.caller.tenant].route(decision.route).context
            if context is not None and budget < context.budget_tokens:
                state.budget_tokens = budget
        return outcome

    def _certified_only(self, state: RequestState) -> None:
        rules = self.governance.of(state.caller.tenant).pii
        if rules is None:
            return
        needed = {rules.certification(kind) for kind in state.raw_data}
        held = self.certified[state.caller.tenant]
        allowed = tuple(b for b in state.chain if needed <= held[b])
        skipped = [b for b in state.chain if b not in allowed]
        for backend in skipped:
            missing = ", ".join(sorted(needed - held[backend]))
            state.findings.append(Finding(self.name, "uncertified_backend", backend, action="skip"))
            if rules.uncertified == "refuse" or not allowed:
                if state.generates:
                    raise FailedPrecondition(
                        f"backend {backend!r} is not certified for {missing}, which this "
                        "request contains; redact it or configure a certified backend"
                    )
                return
        state.chain = allowed

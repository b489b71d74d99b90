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
from router.errors import FailedPrecondition, InvalidArgument
from router.governance.rules import Governance
from router.pipeline import Finding, GenerationLimits, RequestState


class ConfiguredChain:
    name = "policy"

    def __init__(self, tenants: Mapping[str, TenantConfig], governance: Governance):
        self.tenants = tenants
        self.governance = governance
        self.chains = {
            name: {route.name: (route.target, *route.fallbacks) for route in tenant.routes}
            for name, tenant in tenants.items()
            if tenant.backends
        }
        self.certified = {
            name: {b: frozenset(c.certifications) for b, c in tenant.backends.items()}
            for name, tenant in tenants.items()
        }

    async def run(self, state: RequestState) -> None:
        tenant = state.caller.tenant
        chains = self.chains.get(tenant)
        assert state.decision is not None, "policy runs after route"
        if chains is None:
            if state.generates:
                raise FailedPrecondition(f"tenant {tenant!r} has no backends configured")
            return
        state.chain = chains[state.decision.route]
        if state.raw_data:
            self._certified_only(state)
        if state.generates:
            first = self.tenants[tenant].backends[state.chain[0]]
            limit = first.max_output_tokens
            if state.max_tokens is not None and state.max_tokens > limit:
                raise InvalidArgument(
                    f"max_tokens {state.max_tokens} exceeds the backend's {limit}"
                )
            state.limits = GenerationLimits(state.max_tokens or limit, first.temperature)

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

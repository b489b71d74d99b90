"""Policy: which backends may answer, in which order, and within which limits.

This stage reads the route's configured chain (``target``, then ``fallbacks``) and the first
backend's limits. Everything a generation needs is checked here, before stitch and before the
first streamed event, so a bad request is a status and never a broken stream.
"""

from __future__ import annotations

from collections.abc import Mapping

from router.config import TenantConfig
from router.errors import FailedPrecondition, InvalidArgument
from router.pipeline import GenerationLimits, RequestState


class ConfiguredChain:
    name = "policy"

    def __init__(self, tenants: Mapping[str, TenantConfig]):
        self.tenants = tenants
        self.chains = {
            name: {route.name: (route.target, *route.fallbacks) for route in tenant.routes}
            for name, tenant in tenants.items()
            if tenant.backends
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
        if state.generates:
            first = self.tenants[tenant].backends[state.chain[0]]
            limit = first.max_output_tokens
            if state.max_tokens is not None and state.max_tokens > limit:
                raise InvalidArgument(
                    f"max_tokens {state.max_tokens} exceeds the backend's {limit}"
                )
            state.limits = GenerationLimits(state.max_tokens or limit, first.temperature)

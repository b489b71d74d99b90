"""Plexus in process: the configuration's parts built once and wired into one pipeline.

``Plexus`` is the composition root. It builds the key ring, the routing deciders, collections,
SQL mirrors, backend pools, the micro-batching encoder and the bounded executor, then injects
the stages into ``router.pipeline.Pipeline``. The gRPC server is a thin layer over it, and
in-process callers use it directly::

    plexus = Plexus(load_config("plexus.yaml"))
    caller = plexus.keys.authenticate("retail-demo-key")
    decision = await plexus.pipeline.route(caller, RouteQuery("storefront", "where is my order"))
    await plexus.aclose()
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss

from router.backends.resilience import BackendPool
from router.config import ConfigError, LoadedConfig, load_config
from router.context.batching import BatchingEncoder
from router.context.collections import TenantCollections
from router.context.stitch import ContextSources
from router.governance.guards import AppIntentRules, InjectionCheck, PiiRedaction
from router.governance.output import OutputChecks, RestorePlaceholders
from router.governance.rules import Governance, compile_rules, warm
from router.keys import KeyRing
from router.observe.audit import AuditTrail
from router.observe.drift import DriftMonitor
from router.observe.logs import RequestLog
from router.observe.metrics import Metrics
from router.observe.tracing import Tracing
from router.pipeline import OutputGuard, Pipeline, Recorder, Stage
from router.policy.limits import Limits
from router.routing.decider import Deciders
from router.routing.encoder import shared_encoder
from router.stages.budget import Budget
from router.stages.generate import Generate
from router.stages.policy import ConfiguredChain
from router.stages.prep import Prep
from router.stages.route import Route
from router.stages.stitch import Stitch
from router.state import open_store


class Plexus:
    """Every part of a configuration, built once, and the pipeline over them."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        guards_in: Sequence[Stage] = (),
        guards_out: Sequence[OutputGuard] = (),
        recorders: Sequence[Recorder] = (),
        metrics: bool | None = None,
        tracing: Tracing | None = None,
    ):
        """``metrics``: count requests for Prometheus (None: when ``server.metrics_address`` is
        set); ``tracing``: where spans go (None: ``server.tracing``)."""
        self.loaded = loaded
        self.config = loaded.config.server
        tenants = loaded.config.tenants
        # Searches are single queries on the executor's threads: FAISS's OpenMP pool would only
        # add hand-offs and oversubscribe the cores.
        faiss.omp_set_num_threads(1)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="plexus-work")
        device = self.config.device
        self.keys = KeyRing(loaded)
        self.deciders = Deciders(loaded, lambda: shared_encoder(device))
        self.collections = {name: TenantCollections.from_config(loaded, name) for name in tenants}
        self.batcher = BatchingEncoder(lambda: shared_encoder(device), self.executor)
        self.sources = ContextSources(loaded, lambda tenant: self.collections[tenant].get)
        self.backend_pools = {name: BackendPool(t.backends) for name, t in tenants.items()}
        self.governance = Governance(loaded)
        self.state = open_store(self.config.state)
        self.limits = Limits(tenants, self.state)
        self.policy = ConfiguredChain(tenants, self.governance, self.limits)
        # The audit trail records first: a recorder failing after it leaves no request unaudited.
        self.audit = AuditTrail.from_config(loaded)
        self.drift = DriftMonitor.from_config(loaded, self.deciders)
        if metrics is None:
            metrics = self.config.metrics_address is not None
        self.metrics = Metrics(self) if metrics else None
        self.tracing = tracing if tracing is not None else Tracing.from_config(loaded)
        observers: list[Recorder] = [r for r in (self.metrics, self.tracing) if r is not None]
        self.pipeline = Pipeline(
            prep=Prep.from_config(loaded),
            guards_in=[
                PiiRedaction(self.governance),
                InjectionCheck(self.governance, self.batcher),
                *guards_in,
            ],
            route=Route(self.deciders, self.batcher, self.executor),
            route_guards=[AppIntentRules(self.governance)],
            policy=self.policy,
            stitch=Stitch(self.sources, self.batcher, self.executor),
            generate=Generate(
                self.backend_pools,
                {name: t.backends for name, t in tenants.items()},
                tracing=self.tracing,
                note_first_token=bool(observers),
            ),
            guards_out=[RestorePlaceholders(), OutputChecks(self.governance), *guards_out],
            recorders=[
                *([self.audit] if self.audit else []),
                self.drift,
                *observers,
                RequestLog(),
                *recorders,
            ],
            budget=Budget(self.limits),
        )
        if self.tracing is not None:
            self.tracing.follow(self.pipeline)

    def uses_encoder(self) -> bool:
        """Whether any tenant's model or context sources use the sentence encoder."""
        return self.sources.uses_encoder() or any(
            t.uses_encoder for t in self.deciders.tenants.values()
        )

    async def warm(self) -> None:
        """Load and warm the encoder and the governance detectors now, when something uses
        them, not on the first request."""
        self.governance.warm()
        if self.uses_encoder():
            await self.batcher.encode("warm up")

    def reload_rules(self, tenant: str) -> LoadedConfig:
        """Validate the whole configuration file again, then swap in ``tenant``'s governance
        and policy rules (a bad file raises ConfigError and the rules in force keep serving).
        Routes and backends are built at start: a file that changes them is refused."""
        loaded = load_config(self.loaded.path)
        if tenant not in loaded.config.tenants:
            raise ConfigError(f"{self.loaded.path}: tenants: tenant {tenant!r} is gone")
        new, running = loaded.config.tenants[tenant], self.loaded.config.tenants[tenant]
        for part in ("routes", "backends"):
            if getattr(new, part) != getattr(running, part):
                raise ConfigError(
                    f"{self.loaded.path}: tenants.{tenant}.{part}: changed; {part} change on a "
                    "restart, not on a reload"
                )
        rules = compile_rules(new.governance, loaded)
        warm(rules)  # its detectors load before the swap, not on the next request
        self.governance.swap(tenant, rules)
        self.policy.swap(tenant, new)
        return loaded

    async def aclose(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.drift.close()
        self.sources.close()
        for pool in self.backend_pools.values():
            await pool.aclose()
        await self.state.aclose()
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)  # the final checkpoints
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # the spans still queued

"""Prometheus metrics: what each request teaches, counted once it has ended, and the state of
the parts (breakers, models, collections, budgets, drift), read when Prometheus scrapes.

``Metrics`` is one of the pipeline's recorders. Its counters and histograms are plain dicts
of label values -> numbers, changed only on the event loop's thread (recorders are awaited
there) and read on the same thread when ``/metrics`` is served, so counting a request takes
no lock and no ``prometheus_client`` call; the library formats them at scrape time through a
custom collector (:meth:`Metrics.collect`).

Labels are bounded by the configuration: tenants, apps (an app a tenant does not declare is
counted as ``(other)``), routes, model versions, stages, backends, rule names and finding
kinds. No user id, text or request id is ever a label. Each metric also holds at most
``max_series`` series; past that, new label values are counted under ``(other)``, and
``plexus_metric_series_overflow_total`` says which metric overflowed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from router.observe.tracing import stopped_stage

if TYPE_CHECKING:
    from router.pipeline import RequestState
    from router.plexus import Plexus
    from router.policy.limits import BudgetUse

log = logging.getLogger("plexus.metrics")

OTHER = "(other)"
"""The label value that stands for an undeclared app, or for any value past a metric's cap."""
NONE = "(none)"
"""The backend label of a generation no backend answered."""

LATENCY_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
"""Seconds: stages take tens of microseconds, generation takes seconds."""
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
ACTIVITY_SECONDS = 10
"""The width of one bucket of a tenant's recent activity (the status page's chart)."""
ACTIVITY_BUCKETS = 60
MAX_SERIES = 2000
BREAKER_STATES = ("closed", "open", "half_open")


def _plexus_version() -> str:
    try:
        return version("plexus-router")
    except PackageNotFoundError:
        return "unknown"


# -- counting ------------------------------------------------------------------------------------


class Family:
    """The series of one metric: label values -> value, at most ``max_series`` of them."""

    kind = ""

    def __init__(self, name: str, doc: str, labels: Sequence[str], max_series: int = MAX_SERIES):
        self.name = name
        self.doc = doc
        self.labels = tuple(labels)
        self.max_series = max_series
        self.overflowed = 0
        """Observations whose label values were folded into ``(other)`` by the cap."""
        self.series: dict[tuple[str, ...], Any] = {}

    def _key(self, key: tuple[str, ...]) -> tuple[str, ...]:
        """``key``, or the overflow key once the metric holds ``max_series`` series."""
        if len(self.series) < self.max_series:
            return key
        self.overflowed += 1
        return (OTHER,) * len(self.labels)


class Counter(Family):
    """Each series is a one-element list (a cell), so a hot path can keep it and add to it."""

    kind = "counter"

    def cell(self, key: tuple[str, ...]) -> list[float]:
        """The series of ``key`` (made when new; the overflow series past the cap)."""
        found = self.series.get(key)
        if found is None:
            key = self._key(key)
            found = self.series.get(key)
            if found is None:
                found = self.series[key] = [0.0]
        return found

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        found = self.series.get(key)
        if found is None:
            found = self.cell(key)
        found[0] += amount

    def value(self, **labels: str) -> float:
        """The sum over the series whose labels have the given values."""
        wanted = [(self.labels.index(k), v) for k, v in labels.items()]
        return sum(
            n[0] for key, n in list(self.series.items()) if all(key[i] == v for i, v in wanted)
        )

    def values(self) -> dict[tuple[str, ...], float]:
        """Every series' value, by label values."""
        return {key: cell[0] for key, cell in list(self.series.items())}

    def family(self) -> Metric:
        metric = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, cell in list(self.series.items()):
            metric.add_metric(key, cell[0])
        return metric


class Histogram(Family):
    """Counts per bucket (not cumulated: the last one is ``+Inf``), then the sum, per series."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        doc: str,
        labels: Sequence[str],
        bounds: Sequence[float],
        max_series: int = MAX_SERIES,
    ):
        super().__init__(name, doc, labels, max_series)
        self.bounds = tuple(bounds)
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]

    def row(self, key: tuple[str, ...]) -> list[Any]:
        """The series of ``key`` (made when new; the overflow series past the cap)."""
        found = self.series.get(key)
        if found is None:
            key = self._key(key)
            found = self.series.get(key)
            if found is None:
                found = self.series[key] = [0] * (len(self.bounds) + 1) + [0.0]
        return found

    def observe(self, key: tuple[str, ...], value: float) -> None:
        row = self.series.get(key)
        if row is None:
            row = self.row(key)
        row[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        row[-1] += value

    def merged(self, **labels: str) -> list[float]:
        """Bucket counts and sum over the series whose labels have the given values."""
        wanted = [(self.labels.index(k), v) for k, v in labels.items()]
        total = [0.0] * (len(self.bounds) + 2)
        for key, row in list(self.series.items()):
            if all(key[i] == v for i, v in wanted):
                for i, n in enumerate(row):
                    total[i] += n
        return total

    def family(self) -> Metric:
        metric = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, row in list(self.series.items()):
            cumulated, buckets = 0, []
            for le, n in zip(self._les, row[:-1], strict=True):
                cumulated += n
                buckets.append((le, cumulated))
            metric.add_metric(key, buckets, row[-1])
        return metric


@dataclass(slots=True)
class _Slot:
    """The series one kind of request adds to (same tenant, app, RPC, route, outcome, model
    version and abstention), found with one lookup."""

    requests: list[float]
    duration: list[Any]
    decisions: list[float] | None
    confidence: list[Any] | None
    stages: dict[str, list[Any]]
    """This tenant's stage rows, shared by its slots."""


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of a histogram (``counts`` per bucket, the last one ``+Inf``), by
    linear interpolation inside the bucket, as Prometheus's ``histogram_quantile`` does; None
    without observations. A quantile in the ``+Inf`` bucket is the largest finite bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulated = 0.0
    for i, n in enumerate(counts):
        if n and cumulated + n >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - cumulated) / n
        cumulated += n
    return bounds[-1]


@dataclass
class Activity:
    """A tenant's requests and errors per ``ACTIVITY_SECONDS``, the last ``ACTIVITY_BUCKETS``."""

    buckets: deque[list[int]] = field(default_factory=lambda: deque(maxlen=ACTIVITY_BUCKETS))

    def add(self, at_ns: int, failed: bool) -> None:
        slot = at_ns // (ACTIVITY_SECONDS * 1_000_000_000)
        buckets = self.buckets
        if buckets and buckets[-1][0] >= slot:  # (a clock that stepped back counts in the last)
            last = buckets[-1]
        else:
            last = [slot, 0, 0]
            buckets.append(last)
        last[1] += 1
        last[2] += failed

    def series(self, now_ns: int | None = None) -> list[tuple[int, int, int]]:
        """``(start_unix_seconds, requests, errors)`` per bucket, oldest first, every bucket of
        the window (empty ones too) up to now."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        last = now_ns // (ACTIVITY_SECONDS * 1_000_000_000)
        known = {slot: (n, e) for slot, n, e in list(self.buckets)}
        return [
            (slot * ACTIVITY_SECONDS, *known.get(slot, (0, 0)))
            for slot in range(last - ACTIVITY_BUCKETS + 1, last + 1)
        ]


# -- the recorder and the collector --------------------------------------------------------------


class Metrics:
    """The metrics recorder (``record(state)``) and their Prometheus collector (``collect()``).

    ``plexus`` is read at scrape time for the state of its parts: ``backend_pools`` (breakers),
    ``deciders`` (the model serving each tenant), ``collections``, ``limits`` (budgets) and,
    when it has one, ``drift`` (``snapshot()`` readings).
    """

    def __init__(self, plexus: Plexus, *, max_series: int = MAX_SERIES):
        self.plexus = plexus
        self.apps = {name: frozenset(t.apps) for name, t in plexus.loaded.config.tenants.items()}
        self.budgets: dict[str, list[BudgetUse]] = {}
        self.budget_errors = 0
        self.drift_rows: list[dict[str, Any]] | None = None
        """The drift statistics at the last refresh; None while none were read (or the server
        measures no drift)."""
        self.drift_errors = 0
        self.record_errors = 0
        self.activity: dict[str, Activity] = {name: Activity() for name in self.apps}
        self._order: tuple[str, ...] | None = None
        self.max_series = max_series
        self._slots: dict[tuple[Any, ...], _Slot] = {}
        self._stage_rows: dict[str, dict[str, list[Any]]] = {}
        self.version = _plexus_version()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, max_series)

        def histogram(name: str, doc: str, bounds: Sequence[float], *labels: str) -> Histogram:
            return Histogram(name, doc, labels, bounds, max_series)

        self.requests = counter(
            "plexus_requests_total",
            "Requests by outcome (OK, or the gRPC status / streamed error that ended them).",
            *("tenant", "app", "rpc", "route", "outcome"),
        )
        self.duration = histogram(
            "plexus_request_duration_seconds",
            "Server time of a request, from its start to its record (a stream: to its end).",
            LATENCY_BUCKETS,
            *("tenant", "app", "rpc"),
        )
        self.stages = histogram(
            "plexus_stage_duration_seconds",
            "Time in each pipeline stage (and finer entries such as route.encode).",
            LATENCY_BUCKETS,
            *("tenant", "stage"),
        )
        self.refusals = counter(
            "plexus_request_errors_total",
            "Requests that did not end OK, by the stage that stopped them.",
            *("tenant", "app", "rpc", "stage", "outcome"),
        )
        self.decisions = counter(
            "plexus_decisions_total",
            "Routing decisions by route, model version and whether the model abstained.",
            *("tenant", "app", "route", "model_version", "abstained"),
        )
        self.confidence = histogram(
            "plexus_decision_confidence",
            "The routing model's confidence in the chosen route.",
            CONFIDENCE_BUCKETS,
            *("tenant", "model_version"),
        )
        self.findings = counter(
            "plexus_findings_total",
            "Governance findings by stage, kind and what was done about them.",
            *("tenant", "stage", "kind", "action"),
        )
        self.rules = counter(
            "plexus_policy_rules_applied_total",
            "Policy rules that applied to a request.",
            *("tenant", "rule"),
        )
        self.answers = counter(
            "plexus_backend_answers_total",
            "Generations by the backend that answered ((none): no backend could) and outcome.",
            *("tenant", "backend", "outcome"),
        )
        self.attempts = counter(
            "plexus_backend_attempts_total",
            "Tries on the answering backend (the answer included; retries are the rest).",
            *("tenant", "backend"),
        )
        self.fallbacks = counter(
            "plexus_backend_fallbacks_total",
            "Backends that failed before another one of the chain answered.",
            *("tenant", "backend"),
        )
        self.first_token = histogram(
            "plexus_backend_first_token_seconds",
            "Time from a request's start to the answering backend's first token.",
            LATENCY_BUCKETS,
            *("tenant", "backend"),
        )
        self.tokens = counter(
            "plexus_tokens_total",
            "Tokens of answered generations (kind: prompt or completion).",
            *("tenant", "backend", "kind"),
        )
        self.cost = counter(
            "plexus_cost_total",
            "Cost of answered generations, in the currency of the backends' prices.",
            *("tenant", "backend"),
        )
        self.families: tuple[Family, ...] = (
            self.requests,
            self.duration,
            self.stages,
            self.refusals,
            self.decisions,
            self.confidence,
            self.findings,
            self.rules,
            self.answers,
            self.attempts,
            self.fallbacks,
            self.first_token,
            self.tokens,
            self.cost,
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.registry.register(ProcessCollector(registry=None))

    # -- recording ---------------------------------------------------------------------------

    def _stage_order(self) -> tuple[str, ...]:
        if self._order is None:
            self._order = tuple(stage.name for stage in self.plexus.pipeline.to_generate)
        return self._order

    async def record(self, state: RequestState) -> None:
        """Count the request (never fails the request: an error here is logged)."""
        try:
            self.observe(state, time.time_ns())
        except Exception:  # noqa: BLE001 - observing must not fail the request it observes
            self.record_errors += 1
            if self.record_errors <= 10:
                log.exception("counting a request's metrics failed")

    def _slot(self, key: tuple[Any, ...]) -> _Slot:
        tenant, app, rpc, route, outcome, version, abstained = key
        stages = self._stage_rows.setdefault(tenant, {})
        slot = _Slot(
            self.requests.cell((tenant, app, rpc, route, outcome)),
            self.duration.row((tenant, app, rpc)),
            None
            if version is None
            else self.decisions.cell(
                (tenant, app, route, version, "true" if abstained else "false")
            ),
            None if version is None else self.confidence.row((tenant, version)),
            stages,
        )
        if len(self._slots) < 4 * self.max_series:
            self._slots[key] = slot
        return slot

    def observe(self, state: RequestState, end_ns: int) -> None:
        """Count everything the finished request ``state`` teaches, as ended at ``end_ns``."""
        tenant = state.caller.tenant
        app = state.query.app
        if app not in self.apps.get(tenant, ()):
            app = OTHER
        outcome = state.outcome
        decision = state.decision
        if decision is not None:
            route, version = decision.route, decision.model_version
            key = (tenant, app, state.rpc, route, outcome, version, decision.abstained)
        else:
            key = (tenant, app, state.rpc, "", outcome, None, False)
        slot = self._slots.get(key) or self._slot(key)
        slot.requests[0] += 1
        row = slot.duration
        value = (end_ns - state.started_ns) / 1e9
        if value < 0.0:  # the wall clock stepped back
            value = 0.0
        row[bisect_left(LATENCY_BUCKETS, value)] += 1
        row[-1] += value
        rows = slot.stages
        for stage, micros in state.timings_us.items():
            row = rows.get(stage)
            if row is None:
                row = rows[stage] = self.stages.row((tenant, stage))
            value = micros / 1e6
            row[bisect_left(LATENCY_BUCKETS, value)] += 1
            row[-1] += value
        if slot.decisions is not None and decision is not None:
            slot.decisions[0] += 1
            value = decision.confidence
            if 0.0 <= value <= 1.0:  # (NaN is neither)
                row = slot.confidence  # type: ignore[assignment]
                row[bisect_left(CONFIDENCE_BUCKETS, value)] += 1
                row[-1] += value
        failed = outcome != "OK"
        activity = self.activity.get(tenant)
        if activity is not None:
            activity.add(end_ns, failed)
        if state.findings:
            for finding in state.findings:
                self.findings.inc((tenant, finding.stage, finding.kind, finding.action or "none"))
        if state.rules_applied:
            for rule in state.rules_applied:
                self.rules.inc((tenant, rule))
        stage = ""
        if failed:
            stage = stopped_stage(state, self._stage_order())
            self.refusals.inc((tenant, app, state.rpc, stage or "record", outcome))
        final = state.final
        if final is not None:
            backend = final.backend
            self.answers.inc((tenant, backend, outcome))
            self.attempts.inc((tenant, backend), final.attempts)
            for tried in final.fallbacks_tried:
                self.fallbacks.inc((tenant, tried))
            usage = final.usage
            self.tokens.inc((tenant, backend, "prompt"), usage.prompt_tokens)
            self.tokens.inc((tenant, backend, "completion"), usage.completion_tokens)
            if math.isfinite(final.cost):
                self.cost.inc((tenant, backend), final.cost)
        elif stage == "generate":  # the generation started and ended without a final event
            backend = state.served_by or NONE
            self.answers.inc((tenant, backend, outcome))
        else:
            return
        if state.first_token_ns:
            seconds = max(state.first_token_ns - state.started_ns, 0) / 1e9
            self.first_token.observe((tenant, backend), seconds)

    # -- state read at scrape time -----------------------------------------------------------

    async def refresh(self) -> None:
        """Read the budgets' current windows from the state store, and the drift readings
        (off the event loop), before a scrape or a page."""
        plexus = self.plexus
        drift = getattr(plexus, "drift", None)
        snapshot = getattr(drift, "snapshot", None)
        if snapshot is not None:
            try:
                self.drift_rows = drift_rows(await asyncio.to_thread(snapshot))
            except Exception:  # noqa: BLE001 - the page and the scrape go on without it
                self.drift_errors += 1
                log.exception("reading the drift statistics failed")
        for tenant, limits in plexus.limits.tenants.items():
            if not limits.budgets:
                continue
            from router.policy.limits import read_usage

            try:
                self.budgets[tenant] = await read_usage(plexus.limits, tenant)
            except Exception as exc:  # noqa: BLE001 - a scrape shows the last rows and says so
                self.budget_errors += 1
                log.warning("reading the budgets of %s failed: %s", tenant, exc)

    def breakers(self) -> dict[str, dict[str, str]]:
        """Each tenant's breaker state per backend."""
        return {t: pool.breaker_states() for t, pool in self.plexus.backend_pools.items()}

    def models(self) -> dict[str, str]:
        """The model version serving each tenant."""
        return {t: d.active.version for t, d in self.plexus.deciders.tenants.items()}

    def collection_versions(self) -> dict[str, list[tuple[str, str, int]]]:
        """Each tenant's loaded collections: ``(name, version, chunks)``."""
        found: dict[str, list[tuple[str, str, int]]] = {}
        for tenant, collections in self.plexus.collections.items():
            rows = []
            for name in collections.names():
                try:
                    collection = collections.get(name)
                except Exception:  # noqa: BLE001 - swapped out meanwhile
                    continue
                rows.append((name, collection.version, int(collection.size)))
            found[tenant] = rows
        return found

    def collect(self) -> Iterator[Metric]:
        """Every metric, for ``prometheus_client`` (the registry calls this at each scrape)."""
        for family in self.families:
            yield family.family()
        overflow = CounterMetricFamily(
            "plexus_metric_series_overflow",
            "Observations counted under (other) because their metric reached its series cap.",
            labels=["metric"],
        )
        for family in self.families:
            if family.overflowed:
                overflow.add_metric([family.name], family.overflowed)
        yield overflow
        errors = CounterMetricFamily(
            "plexus_metrics_errors", "Failures to count a request or read a part.", labels=["of"]
        )
        errors.add_metric(["record"], self.record_errors)
        errors.add_metric(["budgets"], self.budget_errors)
        errors.add_metric(["drift"], self.drift_errors)
        yield errors
        info = GaugeMetricFamily("plexus_build_info", "The Plexus version.", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        yield from self._state_families()

    def _state_families(self) -> Iterator[Metric]:
        breaker = GaugeMetricFamily(
            "plexus_backend_breaker_state",
            "1 for each backend's current circuit-breaker state, 0 for the others.",
            labels=["tenant", "backend", "state"],
        )
        for tenant, states in self.breakers().items():
            for backend, current in states.items():
                for state in BREAKER_STATES:
                    breaker.add_metric([tenant, backend, state], 1.0 if state == current else 0.0)
        yield breaker
        model = GaugeMetricFamily(
            "plexus_model_info",
            "The model version serving each tenant (1).",
            labels=["tenant", "version"],
        )
        for tenant, serving in self.models().items():
            model.add_metric([tenant, serving], 1)
        yield model
        collection = GaugeMetricFamily(
            "plexus_collection_info",
            "The version of each loaded collection (1).",
            labels=["tenant", "collection", "version"],
        )
        chunks = GaugeMetricFamily(
            "plexus_collection_chunks",
            "Chunks in each loaded collection.",
            labels=["tenant", "collection"],
        )
        for tenant, rows in self.collection_versions().items():
            for name, loaded, size in rows:
                collection.add_metric([tenant, name, loaded], 1)
                chunks.add_metric([tenant, name], size)
        yield collection
        yield chunks
        labels = ["tenant", "budget", "scope", "unit"]
        used = GaugeMetricFamily(
            "plexus_budget_used", "Counted use of each budget's current window.", labels=labels
        )
        reserved = GaugeMetricFamily(
            "plexus_budget_reserved", "Held for answers still running.", labels=labels
        )
        limit = GaugeMetricFamily("plexus_budget_limit", "Each budget's limit.", labels=labels)
        for tenant, rows in list(self.budgets.items()):
            for row in rows:
                key = [tenant, row.budget, row.scope, row.unit]
                used.add_metric(key, row.used)
                reserved.add_metric(key, row.reserved)
                limit.add_metric(key, row.limit)
        yield used
        yield reserved
        yield limit
        processor = getattr(getattr(self.plexus, "tracing", None), "processor", None)
        counts = getattr(processor, "counts", None)  # the OTLP span batcher's
        if callable(counts):
            spans = CounterMetricFamily(
                "plexus_trace_spans",
                "Spans sent to the OTLP collector, failed there (after retries), or dropped "
                "because the queue was full.",
                labels=["outcome"],
            )
            for outcome, count in counts().items():
                spans.add_metric([outcome], count)
            yield spans
        rows = self.drift_rows
        if rows:
            labels = ["tenant", "model_version", "statistic"]
            value = GaugeMetricFamily(
                "plexus_drift_statistic",
                "Each drift statistic of the sliding view (the last window of requests).",
                labels=labels,
            )
            threshold = GaugeMetricFamily(
                "plexus_drift_threshold", "The value above which it alarms.", labels=labels
            )
            alarm = GaugeMetricFamily("plexus_drift_alarm", "1 while it alarms.", labels=labels)
            windows = GaugeMetricFamily(
                "plexus_drift_windows",
                "Windows closed and tested, and those that alarmed.",
                labels=["tenant", "model_version", "verdict"],
            )
            seen: set[tuple[str, str]] = set()
            for r in rows:
                key = [r["tenant"], r["model_version"], r["statistic"]]
                if r["statistic"] and r["value"] is not None:
                    value.add_metric(key, r["value"])
                    if r["threshold"] is not None:
                        threshold.add_metric(key, r["threshold"])
                    alarm.add_metric(key, 1.0 if r["alarm"] else 0.0)
                version = (r["tenant"], r["model_version"])
                if version not in seen and r["windows"] is not None:
                    seen.add(version)
                    windows.add_metric([*version, "tested"], r["windows"])
                    windows.add_metric([*version, "alarmed"], r["alarmed_windows"] or 0)
            yield value
            yield threshold
            yield alarm
            yield windows

    async def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape's body and content type (OpenMetrics when ``accept`` asks for it)."""
        await self.refresh()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    # -- summaries for the status page -------------------------------------------------------

    def tenant_summary(self, tenant: str) -> dict[str, Any]:
        """What the status page shows of ``tenant``: counts, mixes, percentiles, spend."""
        requests = self.requests
        total = requests.value(tenant=tenant)
        errors = total - requests.value(tenant=tenant, outcome="OK")
        routes: dict[str, float] = {}
        for key, n in self.decisions.values().items():
            if key[0] == tenant:
                routes[key[2]] = routes.get(key[2], 0.0) + n
        decided = self.decisions.value(tenant=tenant)
        abstained = self.decisions.value(tenant=tenant, abstained="true")
        stage_names: list[str] = []
        for key in list(self.stages.series):
            if key[0] == tenant and key[1] not in stage_names:
                stage_names.append(key[1])
        stages = []
        for stage in stage_names:
            row = self.stages.merged(tenant=tenant, stage=stage)
            counts = row[:-1]
            stages.append(
                {
                    "stage": stage,
                    "count": sum(counts),
                    **{f"p{q}": quantile(LATENCY_BUCKETS, counts, q / 100) for q in (50, 95, 99)},
                }
            )
        spend: dict[str, float] = {}
        for key, n in self.cost.values().items():
            if key[0] == tenant:
                spend[key[1]] = spend.get(key[1], 0.0) + n
        tokens = {
            kind: self.tokens.value(tenant=tenant, kind=kind) for kind in ("prompt", "completion")
        }
        duration = self.duration.merged(tenant=tenant)[:-1]
        return {
            "tenant": tenant,
            "requests": total,
            "errors": errors,
            "decisions": decided,
            "abstained": abstained,
            "abstention_rate": abstained / decided if decided else None,
            "routes": dict(sorted(routes.items(), key=lambda kv: (-kv[1], kv[0]))),
            "stages": stages,
            "latency": {
                f"p{q}": quantile(LATENCY_BUCKETS, duration, q / 100) for q in (50, 95, 99)
            },
            "spend": spend,
            "cost": sum(spend.values()),
            "tokens": tokens,
            "activity": self.activity[tenant].series() if tenant in self.activity else [],
        }


def _number_or_none(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def drift_rows(readings: Iterable[Any]) -> list[dict[str, Any]]:
    """Drift readings (``router.observe.drift.DriftReading``: per tenant and model version, a
    sliding view and the last closed window, each with its statistics) as flat rows, one per
    statistic of the view shown (the sliding view, else the last window), or one row without
    a statistic for a version with nothing tested yet."""
    rows = []
    for reading in readings:
        base = {
            "tenant": str(getattr(reading, "tenant", "")),
            "model_version": str(getattr(reading, "model_version", "")),
            "active": bool(getattr(reading, "active", False)),
            "requests": _number_or_none(getattr(reading, "requests", None)),
            "windows": _number_or_none(getattr(reading, "windows", None)),
            "alarmed_windows": _number_or_none(getattr(reading, "alarmed_windows", None)),
            "reference": str(getattr(reading, "reference", "")),
        }
        sliding = getattr(reading, "sliding", None)
        view = sliding or getattr(reading, "last_window", None)
        statistics = tuple(getattr(view, "statistics", ()) or ())
        name = "sliding" if view is sliding and view is not None else "last window"
        for statistic in statistics:
            rows.append(
                {
                    **base,
                    "view": name,
                    "statistic": str(getattr(statistic, "name", "")),
                    "value": _number_or_none(getattr(statistic, "value", None)),
                    "threshold": _number_or_none(getattr(statistic, "threshold", None)),
                    "alarm": bool(getattr(statistic, "alarm", False)),
                    "detail": str(getattr(statistic, "detail", "")),
                }
            )
        if not statistics:
            note = str(getattr(view, "note", "")) if view is not None else ""
            rows.append(
                {
                    **base,
                    "view": "",
                    "statistic": "",
                    "value": None,
                    "threshold": None,
                    "alarm": False,
                    "detail": note or base["reference"],
                }
            )
    return rows

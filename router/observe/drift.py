"""Model drift: each routing model's live decisions compared with its decisions on held-out data.

**Reference.** The first time a model version decides a request in this process, the model
decides every row of its held-out set (stored beside it, ``router/routing/registry.py``) once
for each app, because an app's allowed routes change the decision. This runs on a background
thread, never on the request path. Per app it keeps each row's confidence, whether it
abstained and the route it chose. Out-of-scope rows of the held-out set carry
``drift.oos_share`` of the weight. The default is 0: the reference is the model on in-scope
traffic. ``heldout`` keeps the held-out set's own share.

**Live windows**, per tenant and model version (a hot swap or a rollback starts or resumes the
version's own windows): every decision is counted and kept. Each ``drift.window`` requests
close one window, which is tested once on the background thread and counted as alarmed or
not. The sliding view, the last ``window`` requests, is tested whenever it is read
(:meth:`DriftMonitor.snapshot`). Recording is O(1): one tuple appended under a lock.

**Statistics.** Each window is compared with the reference mixed by the window's own counts per
app, so requests from ``store_ops`` are compared with what the model did for ``store_ops``:

- ``labels``: the Jensen–Shannon divergence (bits, 0 to 1) between the answered requests' route
  mix and the reference's. Routes are pooled into bins that expect at least
  :data:`MIN_BIN_EXPECTED` requests in the window and in the reference.
- ``confidence``: the Kolmogorov–Smirnov distance (0 to 1) between the window's confidences and
  the reference's (abstained decisions included).
- ``abstention``: the absolute difference between the window's abstention rate and the
  reference's.

Every threshold is the statistic's critical value for the configured false-alarm probability
(``drift.false_alarm``) at this window's sizes. It counts the reference's own sampling error
(two-sample), so a small held-out set gives wide thresholds. A value in ``drift.thresholds``
replaces the computed threshold. A window alarms when any statistic exceeds its threshold.
``docs/operations.md`` ("Drift") says why these statistics were chosen and how the defaults
were measured.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from router.config import DriftConfig, LoadedConfig
    from router.pipeline import RequestState
    from router.routing.decider import Deciders, ServingModel, TenantDecider

log = logging.getLogger("plexus.drift")

STATISTICS = ("labels", "confidence", "abstention")
"""The statistics of every tested view, in this order."""

MIN_BIN_EXPECTED = 5.0
"""Pooled route bins expect at least this many requests in the window and in the reference,
where the chi-square approximation behind the labels threshold holds."""

PENDING_WINDOWS = 64
"""Closed windows waiting to be tested (for the reference, or for the background thread to catch
up) beyond this many are dropped untested, oldest first."""

Record = tuple[str, str | None, float, bool]
"""One decision as drift keeps it: app, route (None when abstained), confidence, abstained."""


# -- the statistics ------------------------------------------------------------------------------


def _distribution(values: Iterable[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D array of weights")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{what}: weights must be finite and non-negative")
    total = array.sum()
    if total <= 0:
        raise ValueError(f"{what}: weights must not all be zero")
    return array / total


def _kl_bits(p: np.ndarray, m: np.ndarray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log2(p[mask] / m[mask])))


def jensen_shannon(p: Iterable[float] | np.ndarray, q: Iterable[float] | np.ndarray) -> float:
    """The Jensen–Shannon divergence of two distributions over the same categories, in bits.

    ``p`` and ``q`` are non-negative weights (counts or probabilities), normalised here. The
    result is symmetric, 0 exactly when the normalised distributions are equal, and at most 1.
    """
    p, q = _distribution(p, "p"), _distribution(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p has {p.size} categories and q {q.size}; expected the same")
    m = (p + q) / 2
    return min(max(0.5 * (_kl_bits(p, m) + _kl_bits(q, m)), 0.0), 1.0)


def _ecdf(
    sample: Sequence[float] | np.ndarray, given: Sequence[float] | np.ndarray | None, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """The sorted sample and its cumulative weights (starting at 0)."""
    values = np.asarray(sample, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D sample")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what}: the sample must be finite")
    if given is not None and np.shape(given) != values.shape:
        raise ValueError(f"{what}: expected one weight per value")
    weights = _distribution(np.ones(values.size) if given is None else given, f"{what} weights")
    order = np.argsort(values, kind="stable")
    running = np.cumsum(weights[order])
    cumulative = np.concatenate([[0.0], running / running[-1]])  # ends at exactly 1
    return values[order], cumulative


def ks_distance(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    a_weights: Sequence[float] | np.ndarray | None = None,
    b_weights: Sequence[float] | np.ndarray | None = None,
) -> float:
    """The Kolmogorov–Smirnov distance ``sup |F_a(x) - F_b(x)|`` between two samples' (optionally
    weighted) empirical distribution functions: symmetric, in [0, 1], 0 for equal samples."""
    a_sorted, a_cum = _ecdf(a, a_weights, "a")
    b_sorted, b_cum = _ecdf(b, b_weights, "b")
    points = np.concatenate([a_sorted, b_sorted])  # both step functions jump only here
    fa = a_cum[np.searchsorted(a_sorted, points, side="right")]
    fb = b_cum[np.searchsorted(b_sorted, points, side="right")]
    return min(float(np.max(np.abs(fa - fb))), 1.0)


_NORMAL = NormalDist()


def normal_quantile(p: float) -> float:
    """The standard normal distribution's ``p`` quantile."""
    return _NORMAL.inv_cdf(p)


def chi2_survival(x: float, dof: int) -> float:
    """``P(X > x)`` for a chi-square variable with ``dof`` degrees of freedom (closed forms for
    integer degrees of freedom, exact up to rounding; ``dof`` at most 600)."""
    if dof < 1 or dof > 600:
        raise ValueError(f"expected 1 <= dof <= 600, got {dof}")
    if x <= 0.0:
        return 1.0
    if dof % 2 == 0:
        term = total = math.exp(-x / 2.0)
        for i in range(1, dof // 2):
            term *= (x / 2.0) / i
            total += term
        return min(total, 1.0)
    root = math.sqrt(x)
    tail = math.erfc(root / math.sqrt(2.0))  # 2 P(Z > sqrt(x)), without cancellation
    term, total = 1.0, 0.0
    for i in range(1, (dof - 1) // 2 + 1):
        total += term
        term *= x / (2 * i + 1)
    return min(tail + math.sqrt(2.0 * x / math.pi) * math.exp(-x / 2.0) * total, 1.0)


@lru_cache(maxsize=1024)
def chi2_quantile(dof: int, p: float) -> float:
    """The chi-square distribution's ``p`` quantile with ``dof`` degrees of freedom, by
    bisection on :func:`chi2_survival` (the Wilson–Hilferty approximation above 600)."""
    if dof < 1 or not 0.0 < p < 1.0:
        raise ValueError(f"expected dof >= 1 and 0 < p < 1, got dof={dof}, p={p}")
    z = normal_quantile(p)
    h = 2.0 / (9.0 * dof)
    approximate = dof * max(1.0 - h + z * math.sqrt(h), 1e-3) ** 3
    if dof > 600:
        return approximate
    low, high = 0.0, max(2.0 * approximate, 1.0)
    while chi2_survival(high, dof) > 1.0 - p:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        if chi2_survival(middle, dof) > 1.0 - p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-10 * high:
            break
    return (low + high) / 2.0


def ks_critical(alpha: float, n: float, m: float) -> float:
    """The two-sample Kolmogorov–Smirnov distance exceeded with probability about ``alpha``
    when samples of sizes ``n`` and ``m`` come from one continuous distribution (``m`` may be
    ``math.inf``: one sample against a known distribution)."""
    if not 0.0 < alpha < 1.0 or n <= 0 or m <= 0:
        raise ValueError(f"expected 0 < alpha < 1 and positive sizes, got {alpha}, {n}, {m}")
    return math.sqrt(-math.log(alpha / 2.0) / 2.0) * math.sqrt(1.0 / n + 1.0 / m)  # 1/inf = 0


def effective_size(weights: np.ndarray) -> float:
    """Kish's effective sample size of weighted rows: ``(sum w)^2 / sum w^2`` (0 for none)."""
    weights = np.asarray(weights, dtype=np.float64)
    squares = float(np.sum(weights * weights))
    return float(np.sum(weights)) ** 2 / squares if squares > 0 else 0.0


# -- what the readers get ------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftStatistic:
    """One statistic of one view: its value, the threshold it is held to, and the verdict."""

    name: str
    """``labels``, ``confidence`` or ``abstention``."""
    value: float
    threshold: float
    alarm: bool
    """``value > threshold``."""
    detail: str = ""
    """What moved, in words (for example ``abstained 0.291, expected 0.153``)."""


@dataclass(frozen=True)
class DriftView:
    """A set of requests tested against the reference: a closed window or the sliding view."""

    requests: int
    statistics: tuple[DriftStatistic, ...] = ()
    """Empty when nothing was tested (``note`` says why)."""
    alarm: bool = False
    note: str = ""

    def statistic(self, name: str) -> DriftStatistic | None:
        """The statistic called ``name``, or None when this view has none."""
        return next((s for s in self.statistics if s.name == name), None)


@dataclass(frozen=True)
class DriftReading:
    """What drift knows about one tenant's model version in this process."""

    tenant: str
    model_version: str
    active: bool
    """Whether this version is serving the tenant now."""
    requests: int
    """Decisions this version made (and this process recorded)."""
    window: int
    """Requests per window."""
    windows: int
    """Windows closed and tested."""
    alarmed_windows: int
    alarms: dict[str, int]
    """Per statistic, how many tested windows it alarmed."""
    reference_rows: int
    """Held-out rows behind the reference (0 without one)."""
    reference: str
    """``ready``, ``pending`` or why there is none."""
    last_window: DriftView | None
    """The last tested window, None before the first."""
    sliding: DriftView | None
    """The last ``window`` requests, tested now; None without a reference."""

    @property
    def alarm(self) -> bool:
        """Whether the last window or the sliding view alarms."""
        return bool(
            (self.last_window and self.last_window.alarm) or (self.sliding and self.sliding.alarm)
        )


# -- the reference -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppReference:
    """The model's decisions on the held-out rows for one app, with the rows' weights."""

    confidence: np.ndarray
    """Per row, sorted ascending, with ``weights`` in the same order."""
    weights: np.ndarray
    """Per row, summing to 1."""
    abstention: float
    """The weighted abstention rate."""
    label_probs: np.ndarray
    """Over the model's labels: the answered rows' weighted route mix (zeros when none)."""
    answered_rows: float
    """The answered rows' effective number (Kish)."""


@dataclass(frozen=True)
class Reference:
    """A model version's decisions on its held-out set, per app."""

    rows: int
    """Held-out rows with weight."""
    effective_rows: float
    """Their effective number (Kish): the reference's sample size in every threshold."""
    labels: tuple[str, ...]
    apps: dict[str, AppReference]
    label_index: dict[str, int]


def reference_weights(is_oos: np.ndarray, oos_share: float | str) -> tuple[np.ndarray, str]:
    """Row weights, summing to 1, that give the out-of-scope rows ``oos_share`` of the total
    (``"heldout"``: equal weights, the held-out set's own share), and a note when the share
    cannot be met (the set has no out-of-scope rows, or only those)."""
    rows = is_oos.size
    n_oos = int(is_oos.sum())
    if oos_share == "heldout":
        return np.full(rows, 1.0 / rows), ""
    share = float(oos_share)
    if n_oos == 0 or n_oos == rows:
        met = (n_oos == 0 and share == 0.0) or (n_oos == rows and share == 1.0)
        note = "" if met else f"oos_share {share:g} cannot be met: held-out rows are all alike"
        return np.full(rows, 1.0 / rows), note
    return np.where(is_oos, share / n_oos, (1.0 - share) / (rows - n_oos)), ""


def build_reference(
    decider: TenantDecider, model: ServingModel, oos_share: float | str, batch: int = 256
) -> tuple[Reference | None, str]:
    """The model's decisions on its held-out set for every app of the tenant, or None and why.

    The decisions are the serving rule's own (``TenantDecider._decision``), so the reference
    and the live windows can only differ through the traffic.
    """
    heldout = model.heldout
    if not heldout:
        return None, "none: the model has no held-out set"
    oos_label = model.classifier.card.oos_label
    is_oos = np.array([label == oos_label for label in heldout.labels], dtype=bool)
    weights, note = reference_weights(is_oos, oos_share)
    if note:
        log.warning("tenant %s, model %s: %s", decider.name, model.version, note)
    keep = weights > 0  # rows without weight need no decision
    texts = [t for t, k in zip(heldout.texts, keep, strict=True) if k]
    weights = weights[keep]
    featurizer = model.classifier.featurizer
    probs = np.concatenate(
        [
            model.probabilities(
                texts[i : i + batch], featurizer.featurize_batch(texts[i : i + batch])
            )
            for i in range(0, len(texts), batch)
        ]
    )
    index = {label: i for i, label in enumerate(model.labels)}
    apps: dict[str, AppReference] = {}
    for app in model.app_labels:
        decisions = [decider._decision(model, app, row) for row in probs]
        confidence = np.array([d.confidence for d in decisions], dtype=np.float64)
        abstained = np.array([d.abstained for d in decisions], dtype=bool)
        label_probs = np.zeros(len(model.labels))
        for d, w in zip(decisions, weights, strict=True):
            if not d.abstained:
                label_probs[index[d.route]] += w
        answered_mass = label_probs.sum()
        if answered_mass > 0:
            label_probs /= answered_mass
        order = np.argsort(confidence, kind="stable")
        apps[app] = AppReference(
            confidence=confidence[order],
            weights=weights[order],
            abstention=float(np.sum(weights[abstained])),
            label_probs=label_probs,
            answered_rows=effective_size(weights[~abstained]),
        )
    reference = Reference(
        len(texts), effective_size(weights), tuple(model.labels), apps, dict(index)
    )
    return reference, "ready"


# -- testing a set of requests --------------------------------------------------------------------


def _verdict(
    name: str, value: float, computed: float, fixed: float | None, detail: str
) -> DriftStatistic:
    threshold = computed if fixed is None else fixed
    return DriftStatistic(name, value, threshold, value > threshold, detail)


TWO_SAMPLE_BELOW = 5
"""``two_sample: auto`` counts the reference's sampling error when it holds fewer rows than this
many windows: below that its error adds more than a fifth to a window's variance."""


def uses_two_sample(reference: Reference, config: DriftConfig) -> bool:
    """Whether the thresholds count the reference's own sampling error too."""
    if config.two_sample == "auto":
        return reference.effective_rows < TWO_SAMPLE_BELOW * config.window
    return bool(config.two_sample)


def evaluate(reference: Reference, records: Sequence[Record], config: DriftConfig) -> DriftView:
    """Test ``records`` (one window, or the sliding view) against ``reference``."""
    used = [r for r in records if r[0] in reference.apps]
    m = len(used)
    if m == 0:
        return DriftView(len(records), note="no request of an app the reference knows")
    per_app: dict[str, int] = {}
    for app, *_ in used:
        per_app[app] = per_app.get(app, 0) + 1
    n = reference.effective_rows
    rates, fixed = config.false_alarm, config.thresholds
    two_sample = uses_two_sample(reference, config)

    # abstention: observed rate against the rate the reference expects for this app mix
    observed = sum(1 for r in used if r[3]) / m
    expected = window_var = reference_var = 0.0
    for app, count in per_app.items():
        p = (reference.apps[app].abstention * n + 0.5) / (n + 1.0)  # never exactly 0 or 1
        expected += count * p / m
        window_var += count * p * (1.0 - p) / (m * m)
        if two_sample:
            reference_var += (count / m) * p * (1.0 - p) / n
    abstention = _verdict(
        "abstention",
        abs(observed - expected),
        normal_quantile(1.0 - rates.abstention / 2.0) * math.sqrt(window_var + reference_var),
        fixed.abstention,
        f"abstained {observed:.3f}, expected {expected:.3f}",
    )

    # confidence: the window's sample against the reference mixture of the same apps
    confidences = np.array([r[2] for r in used], dtype=np.float64)
    ref_values = np.concatenate([reference.apps[a].confidence for a in per_app])
    ref_weights = np.concatenate([reference.apps[a].weights * (c / m) for a, c in per_app.items()])
    ks = ks_distance(confidences, ref_values, None, ref_weights)
    ref_order = np.argsort(ref_values, kind="stable")
    ref_cum = np.cumsum(ref_weights[ref_order])
    ref_median = float(ref_values[ref_order][np.searchsorted(ref_cum, 0.5 * ref_cum[-1])])
    confidence = _verdict(
        "confidence",
        ks,
        ks_critical(rates.confidence, m, n if two_sample else math.inf),
        fixed.confidence,
        f"median {float(np.median(confidences)):.3f}, reference {ref_median:.3f}",
    )
    labels = _label_statistic(reference, used, config, two_sample)
    tested = (labels, confidence, abstention) if labels else (confidence, abstention)
    note = "" if labels else "labels: too few answered requests to test"
    return DriftView(m, tested, any(s.alarm for s in tested), note)


def _label_statistic(
    reference: Reference, used: Sequence[Record], config: DriftConfig, two_sample: bool
) -> DriftStatistic | None:
    index = reference.label_index
    counts = np.zeros(len(reference.labels))
    per_app: dict[str, int] = {}
    for app, route, _, abstained in used:
        if abstained or route not in index or reference.apps[app].answered_rows <= 0:
            continue
        counts[index[route]] += 1
        per_app[app] = per_app.get(app, 0) + 1
    answered = int(counts.sum())
    if answered < 2 * MIN_BIN_EXPECTED:
        return None
    expected = np.zeros(len(reference.labels))
    inverse_rows = 0.0
    for app, count in per_app.items():
        ref = reference.apps[app]
        expected += ref.label_probs * (count / answered)
        inverse_rows += (count / answered) / ref.answered_rows
    reference_rows = 1.0 / inverse_rows
    bins = pool_bins(expected, min(answered, reference_rows))
    if len(bins) < 2:
        return None
    observed_bins = np.array([counts[b].sum() for b in bins])
    expected_bins = np.array([expected[b].sum() for b in bins])
    value = jensen_shannon(observed_bins, expected_bins)
    computed = (
        chi2_quantile(len(bins) - 1, 1.0 - config.false_alarm.labels)
        * (1.0 / answered + (1.0 / reference_rows if two_sample else 0.0))
        / (8.0 * math.log(2.0))
    )
    shares = counts / answered
    moved = int(np.argmax(np.abs(shares - expected)))
    detail = (
        f"{len(bins)} bins over {answered} answered; most moved: {reference.labels[moved]} "
        f"{shares[moved]:.3f} vs {expected[moved]:.3f}"
    )
    return _verdict("labels", value, computed, config.thresholds.labels, detail)


def pool_bins(expected: np.ndarray, size: float) -> list[list[int]]:
    """Group categories, rarest first, so each group's expected count ``size * sum(p)`` is at
    least :data:`MIN_BIN_EXPECTED`; a short last group joins the one before it. The grouping
    depends only on the reference, never on what was observed."""
    order = np.argsort(expected, kind="stable")
    bins: list[list[int]] = []
    current: list[int] = []
    mass = 0.0
    for j in order.tolist():
        current.append(j)
        mass += float(expected[j])
        if mass * size >= MIN_BIN_EXPECTED:
            bins.append(current)
            current, mass = [], 0.0
    if current:
        if bins:
            bins[-1].extend(current)
        else:
            bins.append(current)
    return bins


# -- the live windows ----------------------------------------------------------------------------


class _Live:
    """One tenant's model version: its counters, open and closed windows and reference."""

    def __init__(self, tenant: str, version: str, model: ServingModel | None, config: DriftConfig):
        self.tenant = tenant
        self.version = version
        self.model = model
        """Held until the reference is built, then released."""
        self.config = config
        self.requests = 0
        self.current: list[Record] = []
        self.previous: list[Record] = []
        self.pending: deque[list[Record]] = deque()
        self.windows = 0
        self.alarmed = 0
        self.alarms = dict.fromkeys(STATISTICS, 0)
        self.last: DriftView | None = None
        self.reference: Reference | None = None
        self.status = "pending" if model is not None else "none: the version is not loaded"


class DriftMonitor:
    """Live drift windows for every tenant that enables ``drift``; a pipeline recorder.

    :meth:`record` is awaited once per request and only appends; :meth:`snapshot` is the read
    API (``Admin.GetDrift``, ``plexus drift``, metrics and the status page), safe from any
    thread.
    """

    def __init__(self, loaded: LoadedConfig, deciders: Deciders):
        self.deciders = deciders
        self.configs = {
            name: tenant.drift
            for name, tenant in loaded.config.tenants.items()
            if tenant.drift.enabled
        }
        self._live: dict[tuple[str, str], _Live] = {}
        self._lock = threading.Lock()
        """Guards the windows and counters (held for an append)."""
        self._work = threading.Lock()
        """One evaluator at a time: the background thread or a reader."""
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    @classmethod
    def from_config(cls, loaded: LoadedConfig, deciders: Deciders) -> DriftMonitor:
        return cls(loaded, deciders)

    # -- the request path ----------------------------------------------------------------------

    async def record(self, state: RequestState) -> None:
        """Count the request's decision in its model version's window (no decision: nothing)."""
        decision = state.decision
        if decision is None:
            return
        tenant = state.caller.tenant
        try:
            config = self.configs.get(tenant)
            if config is None:
                return
            key = (tenant, decision.model_version)
            confidence = decision.confidence
            record: Record = (
                state.query.app,
                None if decision.abstained else decision.route,
                confidence if math.isfinite(confidence) else 0.0,  # as a non-finite decision
                decision.abstained,
            )
            with self._lock:
                live = self._live.get(key)
                fresh = live is None
                if live is None:
                    live = self._open(tenant, decision.model_version, config)
                live.current.append(record)
                live.requests += 1
                closed = len(live.current) >= config.window
                if closed:
                    live.previous = live.current
                    live.pending.append(live.current)
                    live.current = []
                    if len(live.pending) > PENDING_WINDOWS:
                        live.pending.popleft()
            if closed or fresh:
                self._background()  # a fresh version's reference, or the window's test
        except Exception:  # noqa: BLE001 - drift never fails a request
            log.exception("drift: recording a decision of tenant %s failed", tenant)

    def _open(self, tenant: str, version: str, config: DriftConfig) -> _Live:
        """A new version's state (under ``_lock``); the oldest inactive versions beyond
        ``config.versions`` are forgotten."""
        live = _Live(tenant, version, self._model(tenant, version), config)
        self._live[(tenant, version)] = live
        mine = [k for k in self._live if k[0] == tenant]
        active = self._active_version(tenant)
        for key in mine[: max(len(mine) - config.versions, 0)]:
            if key[1] != active and key[1] != version:
                del self._live[key]
        return live

    def _model(self, tenant: str, version: str) -> ServingModel | None:
        decider = self.deciders.tenants.get(tenant)
        if decider is None:
            return None
        for model in (decider.active, *reversed(decider.history)):
            if model.version == version:
                return model
        return None

    def _active_version(self, tenant: str) -> str:
        decider = self.deciders.tenants.get(tenant)
        return decider.active.version if decider is not None else ""

    def _background(self) -> None:
        if self._closed:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plexus-drift")
        self._pool.submit(self._drain_logged)

    # -- off the request path ----------------------------------------------------------------

    def _drain_logged(self) -> None:
        try:
            self.drain()
        except Exception:  # noqa: BLE001 - a background thread has no caller to tell
            log.exception("drift: testing windows failed")

    def drain(self) -> None:
        """Build the references still missing and test every closed window (the background
        thread does this after each window; readers call it before they read)."""
        with self._work:
            with self._lock:
                lives = list(self._live.values())
            for live in lives:
                if live.status == "pending" and live.model is not None:
                    self._build(live)
                while True:
                    with self._lock:
                        if not live.pending:
                            break
                        records = live.pending.popleft()
                    if live.reference is None:
                        continue  # no reference: the window cannot be tested
                    view = evaluate(live.reference, records, live.config)
                    with self._lock:
                        live.windows += 1
                        live.alarmed += view.alarm
                        for statistic in view.statistics:
                            live.alarms[statistic.name] += statistic.alarm
                        live.last = view

    def _build(self, live: _Live) -> None:
        decider = self.deciders.tenants[live.tenant]
        assert live.model is not None
        try:
            reference, status = build_reference(decider, live.model, live.config.oos_share)
        except Exception as exc:  # noqa: BLE001 - a model that cannot decide its own rows
            log.exception("drift: the reference of %s %s failed", live.tenant, live.version)
            reference, status = None, f"none: the reference failed ({type(exc).__name__})"
        live.reference, live.status, live.model = reference, status, None

    # -- the read API --------------------------------------------------------------------------

    def snapshot(self, tenant: str | None = None) -> list[DriftReading]:
        """Every tenant's (or ``tenant``'s) model versions as drift sees them now, the active
        one included before its first request; tests the sliding views, so call it off the
        event loop (it takes about a millisecond per version)."""
        with self._lock:
            for name, config in self.configs.items():
                if tenant is not None and name != tenant:
                    continue
                version = self._active_version(name)
                if version and (name, version) not in self._live:
                    self._open(name, version, config)
        self.drain()
        readings = []
        with self._lock:
            lives = [live for key, live in sorted(self._live.items()) if tenant in (None, key[0])]
        for live in lives:
            readings.append(self._reading(live))
        return readings

    def _reading(self, live: _Live) -> DriftReading:
        config = live.config
        with self._lock:
            current, previous = list(live.current), live.previous
            need = config.window - len(current)
            recent = (previous[len(previous) - need :] if need > 0 else []) + current
            counters = (live.requests, live.windows, live.alarmed, dict(live.alarms), live.last)
        sliding: DriftView | None = None
        if live.reference is not None:
            if len(recent) < config.min_requests:
                sliding = DriftView(len(recent), note=f"tested from {config.min_requests} requests")
            else:
                sliding = evaluate(live.reference, recent, config)
        requests, windows, alarmed, alarms, last = counters
        return DriftReading(
            tenant=live.tenant,
            model_version=live.version,
            active=live.version == self._active_version(live.tenant),
            requests=requests,
            window=config.window,
            windows=windows,
            alarmed_windows=alarmed,
            alarms=alarms,
            reference_rows=live.reference.rows if live.reference is not None else 0,
            reference=live.status,
            last_window=last,
            sliding=sliding,
        )

    def close(self) -> None:
        """Stop the background thread (windows not yet tested are left untested)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

"""The metrics address: ``/metrics`` (Prometheus), ``/status`` (the operator page), ``/healthz``.

The status page is read-only, server-rendered HTML with small inline SVG charts: no script,
no external asset, no build step. Per tenant it shows the requests and errors, the route mix,
the abstention rate, latency percentiles overall and per stage, spend and tokens, the breaker
state of each backend, the model version and collection versions, budgets and drift. Every
number comes from the same counters ``/metrics`` exports (percentiles are estimated from the
histogram buckets, as Prometheus's ``histogram_quantile`` does), and each carries its exact
value in a ``data-value`` attribute. The page reloads itself every ``REFRESH_SECONDS``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING, Any

from aiohttp import web

from router.observe.metrics import LATENCY_BUCKETS, Metrics, quantile

if TYPE_CHECKING:
    from router.plexus import Plexus

REFRESH_SECONDS = 10
NOT_MEASURED = "not measured"

_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;
background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:18px;margin:0}header span{color:#aab2c5;font-size:12px}
main{padding:16px 24px;display:grid;gap:16px}
section.tenant{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:16px}
section.tenant h2{margin:0 0 12px;font-size:16px}
.kpis{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:12px}
.kpi{border:1px solid #e4e7ed;border-radius:6px;padding:8px 12px;min-width:110px}
.kpi .label{font-size:11px;color:#5d6678;text-transform:uppercase;letter-spacing:.04em}
.kpi .value{font-size:20px;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:16px}
h3{font-size:13px;margin:8px 0;color:#3c4558}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #eef0f4}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.badge{display:inline-block;padding:0 6px;border-radius:4px;font-size:12px}
.closed{background:#dff3e4;color:#17692e}.open{background:#fde2e1;color:#a2201a}
.half_open{background:#fff1d6;color:#8a5a00}
.alarm{color:#a2201a;font-weight:600}.muted{color:#8a93a6}
svg text{font-size:11px;fill:#3c4558}
"""


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:,.{digits}f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _duration(seconds: float | None) -> str:
    """``412 µs``, ``3.2 ms``, ``1.25 s``."""
    if seconds is None:
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _value(value: float | None) -> str:
    """A number for a ``data-value`` attribute: exact, or empty when there is none."""
    return "" if value is None else repr(float(value))


def _kpi(name: str, label: str, shown: str, value: float | None) -> str:
    return (
        f'<div class="kpi" data-metric="{name}" data-value="{_value(value)}">'
        f'<div class="label">{escape(label)}</div><div class="value">{escape(shown)}</div></div>'
    )


def activity_chart(series: Sequence[tuple[int, int, int]], width: int = 320) -> str:
    """Requests (and errors, in red) per bucket of the recent window, as a bar chart."""
    height = 48
    peak = max((n for _, n, _ in series), default=0) or 1
    step = width / max(len(series), 1)
    bars = []
    for i, (_, n, errors) in enumerate(series):
        x = i * step
        h = n / peak * (height - 12)
        e = errors / peak * (height - 12)
        if n:
            bars.append(
                f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{max(step - 1, 1):.1f}" '
                f'height="{h:.1f}" fill="#5b7bd5"/>'
            )
        if errors:
            bars.append(
                f'<rect x="{x:.1f}" y="{height - e:.1f}" width="{max(step - 1, 1):.1f}" '
                f'height="{e:.1f}" fill="#d64541"/>'
            )
    minutes = len(series) * 10 // 60
    return (
        f'<svg class="chart activity" width="{width}" height="{height + 14}" role="img" '
        f'aria-label="requests per 10 seconds">{"".join(bars)}'
        f'<text x="0" y="{height + 12}">−{minutes} min</text>'
        f'<text x="{width - 24}" y="{height + 12}">now</text>'
        f'<text x="{width - 60}" y="10">peak {peak}</text></svg>'
    )


def route_chart(routes: dict[str, float], width: int = 340) -> str:
    """The route mix as horizontal bars, largest first."""
    if not routes:
        return '<p class="muted">no decisions yet</p>'
    total = sum(routes.values()) or 1
    row, label_width = 18, 130
    parts = []
    for i, (route, n) in enumerate(routes.items()):
        y = i * row
        w = (width - label_width - 70) * n / max(routes.values())
        parts.append(
            f'<g data-route="{escape(route)}" data-value="{_value(n)}">'
            f'<text x="0" y="{y + 13}">{escape(route[:20])}</text>'
            f'<rect x="{label_width}" y="{y + 3}" width="{w:.1f}" height="12" fill="#5b7bd5"/>'
            f'<text x="{label_width + w + 4:.1f}" y="{y + 13}">{_num(n)} '
            f"({n / total * 100:.0f}%)</text></g>"
        )
    return (
        f'<svg class="chart routes" width="{width}" height="{len(routes) * row + 4}" role="img" '
        f'aria-label="route mix">{"".join(parts)}</svg>'
    )


def stage_chart(stages: Sequence[dict[str, Any]], width: int = 340) -> str:
    """Each stage's p50 (dark) and p99 (light), on a log scale from 10 µs to 10 s."""
    shown = [s for s in stages if s["p50"] is not None and "." not in s["stage"]]
    if not shown:
        return ""
    row, label_width = 18, 110
    span = width - label_width - 10

    def x(seconds: float) -> float:
        low, high = math.log10(1e-5), math.log10(10.0)
        return span * (min(max(math.log10(max(seconds, 1e-6)), low), high) - low) / (high - low)

    parts = []
    for i, stage in enumerate(shown):
        y = i * row
        parts.append(
            f'<text x="0" y="{y + 13}">{escape(stage["stage"][:16])}</text>'
            f'<rect x="{label_width}" y="{y + 3}" width="{x(stage["p99"] or 0):.1f}" height="12" '
            f'fill="#c9d4f2"/><rect x="{label_width}" y="{y + 3}" '
            f'width="{x(stage["p50"]):.1f}" height="12" fill="#3654b5"/>'
        )
    ticks = "".join(
        f'<text x="{label_width + x(t):.1f}" y="{len(shown) * row + 12}"{anchor}>{label}</text>'
        for t, label, anchor in (
            (1e-5, "10µs", ""),
            (1e-3, "1ms", ' text-anchor="middle"'),
            (1e-1, "100ms", ' text-anchor="middle"'),
            (10.0, "10s", ' text-anchor="end"'),
        )
    )
    return (
        f'<svg class="chart stages" width="{width}" height="{len(shown) * row + 16}" role="img" '
        f'aria-label="stage latency p50 and p99">{"".join(parts)}{ticks}</svg>'
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    head = "".join(
        f'<th class="n">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def tenant_section(
    metrics: Metrics,
    tenant: str,
    *,
    model: str,
    breakers: dict[str, str],
    collections: Sequence[tuple[str, str, int]],
    drift: list[dict[str, Any]] | None,
) -> str:
    """One tenant's part of the page."""
    s = metrics.tenant_summary(tenant)
    requests, errors = s["requests"], s["errors"]
    latency = s["latency"]
    kpis = "".join(
        [
            _kpi("requests", "requests", _num(requests), requests),
            _kpi("errors", "errors", _num(errors), errors),
            _kpi(
                "error-rate",
                "error rate",
                _percent(errors / requests if requests else None),
                errors / requests if requests else None,
            ),
            _kpi(
                "abstention-rate",
                "abstention rate",
                _percent(s["abstention_rate"]),
                s["abstention_rate"],
            ),
            _kpi("latency-p50", "latency p50", _duration(latency["p50"]), latency["p50"]),
            _kpi("latency-p99", "latency p99", _duration(latency["p99"]), latency["p99"]),
            _kpi("cost", "spend", _num(s["cost"], 4), s["cost"]),
            _kpi(
                "tokens",
                "tokens",
                _num(s["tokens"]["prompt"] + s["tokens"]["completion"]),
                s["tokens"]["prompt"] + s["tokens"]["completion"],
            ),
        ]
    )
    stage_rows = [
        [
            escape(st["stage"]),
            f'<span data-stage="{escape(st["stage"])}" data-value="{_value(st["count"])}">'
            f"{_num(st['count'])}</span>",
            *(
                f'<span data-stage-p="{escape(st["stage"])}:{q}" data-value="{_value(st[q])}">'
                f"{_duration(st[q])}</span>"
                for q in ("p50", "p95", "p99")
            ),
        ]
        for st in s["stages"]
    ]
    spend = s["spend"]
    first_token = metrics.first_token
    backend_rows = []
    for backend, state in sorted(breakers.items()):
        answered = metrics.answers.value(tenant=tenant, backend=backend)
        counts = first_token.merged(tenant=tenant, backend=backend)[:-1]
        backend_rows.append(
            [
                escape(backend),
                f'<span class="badge {escape(state)}" data-breaker="{escape(backend)}">'
                f"{escape(state)}</span>",
                _num(answered),
                _duration(quantile(LATENCY_BUCKETS, counts, 0.5)),
                _num(spend.get(backend), 4),
            ]
        )
    collection_rows = [
        [escape(name), f'<span data-collection="{escape(name)}">{escape(v)}</span>', _num(n)]
        for name, v, n in collections
    ]
    budget_rows = [
        [
            escape(r.budget),
            escape(r.scope),
            escape(r.unit),
            _num(r.used, 4 if r.unit == "cost" else 0),
            _num(r.reserved, 4 if r.unit == "cost" else 0),
            _num(r.limit, 2 if r.unit == "cost" else 0),
            _percent(r.used / r.limit if r.limit else None),
        ]
        for r in metrics.budgets.get(tenant, [])
    ]
    if drift is None:
        drift_html = f'<p class="muted" data-drift="none">{NOT_MEASURED}</p>'
    else:
        mine = [r for r in drift if r["tenant"] == tenant]
        drift_rows = []
        for r in mine:
            verdict = '<span class="alarm">alarm</span>' if r["alarm"] else "ok"
            drift_rows.append(
                [
                    escape(r["model_version"]) + (" *" if r["active"] else ""),
                    escape(r["view"] or "–"),
                    f'<span data-drift="{escape(r["model_version"])}:{escape(r["statistic"])}" '
                    f'data-value="{_value(r["value"])}">{escape(r["statistic"] or "–")}</span>',
                    _num(r["value"], 4),
                    _num(r["threshold"], 4),
                    verdict if r["statistic"] else escape(r["detail"][:80]),
                    f"{_num(r['alarmed_windows'])} / {_num(r['windows'])}",
                ]
            )
        drift_html = (
            _table(
                ["model", "view", "statistic", "value", "threshold", "verdict", "windows alarmed"],
                drift_rows,
                {3, 4, 6},
            )
            if drift_rows
            else '<p class="muted" data-drift="empty">no readings yet</p>'
        )
    budgets = (
        _table(
            ["budget", "scope", "unit", "used", "reserved", "limit", "use"],
            budget_rows,
            {3, 4, 5, 6},
        )
        if budget_rows
        else '<p class="muted">no budgets</p>'
    )
    loaded = (
        _table(["collection", "version", "chunks"], collection_rows, {2})
        if collection_rows
        else '<p class="muted">none loaded</p>'
    )
    backends = _table(
        ["backend", "breaker", "answers", "first token p50", "spend"], backend_rows, {2, 3, 4}
    )
    stages = _table(["stage", "count", "p50", "p95", "p99"], stage_rows, {1, 2, 3, 4})
    name = escape(tenant)
    return f"""
<section class="tenant" id="tenant-{name}" data-tenant="{name}">
<h2>{name} <span class="muted" data-model="{escape(model)}">model {escape(model)}</span></h2>
<div class="kpis">{kpis}</div>
<div class="grid">
<div><h3>Requests per 10 s (errors in red)</h3>{activity_chart(s["activity"])}
<h3>Route mix</h3>{route_chart(s["routes"])}</div>
<div><h3>Latency per stage (p50 dark, p99 light)</h3>{stage_chart(s["stages"])}{stages}</div>
<div><h3>Backends</h3>{backends}<h3>Budgets</h3>{budgets}</div>
<div><h3>Collections</h3>{loaded}<h3>Drift</h3>{drift_html}</div>
</div></section>"""


def render_status(metrics: Metrics, tenants: Sequence[str] | None = None) -> str:
    """The whole page (every tenant, or those named)."""
    names = list(tenants) if tenants is not None else sorted(metrics.apps)
    models = metrics.models()
    breakers = metrics.breakers()
    collections = metrics.collection_versions()
    drift = metrics.drift_rows
    sections = "".join(
        tenant_section(
            metrics,
            t,
            model=models.get(t, ""),
            breakers=breakers.get(t, {}),
            collections=collections.get(t, []),
            drift=drift,
        )
        for t in names
    )
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Plexus status</title><style>{_STYLE}</style></head>
<body><header><h1>Plexus status</h1><span>version {escape(metrics.version)}</span>
<span data-generated="{time.time():.3f}">{now}</span>
<span>counts since the server started; percentiles estimated from histogram buckets</span></header>
<main>{sections}</main></body></html>
"""


class Observer:
    """The aiohttp application of the metrics address."""

    def __init__(self, plexus: Plexus, serving: Callable[[], bool] = lambda: True):
        if plexus.metrics is None:
            raise ValueError("the metrics address needs Plexus built with metrics on")
        self.plexus = plexus
        self.metrics: Metrics = plexus.metrics
        self.serving = serving

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.scrape)
        app.router.add_get("/status", self.status)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/", self.root)
        return app

    async def scrape(self, request: web.Request) -> web.Response:
        body, content_type = await self.metrics.exposition(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def status(self, request: web.Request) -> web.Response:
        await self.metrics.refresh()
        wanted = request.query.getall("tenant", [])
        unknown = [t for t in wanted if t not in self.metrics.apps]
        if unknown:
            raise web.HTTPNotFound(text=f"no tenant {unknown[0][:64]!r}\n")
        page = render_status(self.metrics, wanted or None)
        return web.Response(
            text=page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    async def healthz(self, request: web.Request) -> web.Response:
        serving = self.serving()
        return web.Response(
            text=json.dumps({"status": "serving" if serving else "not_serving"}) + "\n",
            status=200 if serving else 503,
            content_type="application/json",
        )

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/status")


async def start_observer(
    plexus: Plexus,
    address: str,
    serving: Callable[[], bool] = lambda: True,
    reuse_port: bool = False,
) -> tuple[web.AppRunner, int]:
    """Serve ``/metrics``, ``/status`` and ``/healthz`` on ``address`` (``HOST:PORT``; port 0
    picks one); the runner to clean up, and the port. ``reuse_port``: the workers of one
    ``serve --workers`` share it (each scrape then reaches one worker's own counts)."""
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(Observer(plexus, serving).app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]") or None, int(port), reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    sockets = site._server.sockets if site._server is not None else []  # noqa: SLF001
    return runner, int(sockets[0].getsockname()[1]) if sockets else int(port)

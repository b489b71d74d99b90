"""Prometheus metrics over a real server: Route, RouteBatch, Orchestrate and refusals driven
over gRPC, /metrics scraped over HTTP and checked by value; label cardinality stays bounded."""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.config import ConfigError, parse_config
from router.context.ingest import ingest
from router.observe.metrics import Activity, Counter, Histogram, Metrics, quantile

from .conftest import DEMO_KEY, KNOWLEDGE, RunningServer, context_config, demo_config_data
from .openai_peer import Behaviour, OpenAIPeer

DISPUTE = "you charged my card twice for one order and I want my money back"
TEXTS = [
    "where is my order 88123?",
    "is the red kettle in stock at store 77?",
    "what time does store #77 close on sunday",
    "I want to return these shoes",
    "tell me a joke about penguins",
    "how do I reset my rewards password",
]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- scraping ------------------------------------------------------------------------------------


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    """Status, content type and body of a GET."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(port: int) -> Samples:
    """Every sample of ``/metrics``, by name and labels."""
    status, _, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def buckets(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """``(le, cumulative count)`` of a histogram's series summed over the other labels."""
    by_le: dict[float, float] = {}
    wanted = set(labels.items())
    for (n, ls), v in samples.items():
        if n == f"{name}_bucket" and wanted <= ls:
            le = float(dict(ls)["le"])
            by_le[le] = by_le.get(le, 0.0) + v
    return sorted(by_le.items())


# -- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peer() -> Iterator[OpenAIPeer]:
    running = OpenAIPeer()
    yield running
    running.close()


def observed_config(data: dict, peer: OpenAIPeer) -> None:
    """Metrics on an ephemeral port, the large model at the peer, a tight per-user rate limit
    on case_desk and a daily cost budget."""
    data["server"]["metrics_address"] = "127.0.0.1:0"
    retail = data["tenants"]["retail"]
    retail["backends"]["reasoning-large"] = {
        "kind": "openai",
        "url": peer.url,
        "model": "big-model",
        "timeout_seconds": 10,
        "retry": {"attempts": 2, "backoff_ms": 10, "max_backoff_ms": 50},
        "breaker": {"failures": 4, "reset_seconds": 300},
        "price": {"input_per_1k": 3.0, "output_per_1k": 15.0},
    }
    retail["policy"]["rate_limits"] = [
        {
            "name": "desk-user",
            "per": "user",
            "apps": ["case_desk"],
            "requests": {"rate": 1, "per_seconds": 3600, "burst": 1},
        }
    ]
    retail["policy"]["budgets"] = [
        {"name": "daily", "per": "tenant", "period": "day", "cost": 1000}
    ]
    retail["policy"]["on_state_error"] = "fail_closed"
    retail["governance"] = {"pii": {"learned": False}}  # pattern detectors: cards, addresses
    for tenant in data["tenants"].values():
        tenant["audit"] = {"enabled": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, peer: OpenAIPeer) -> Iterator[RunningServer]:
    loaded = context_config(
        tmp_path_factory.mktemp("observe-metrics"), lambda data: observed_config(data, peer)
    )
    ingest(loaded, "retail", "policies", [KNOWLEDGE / "disputes.txt"])
    running = RunningServer(loaded)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def port(server: RunningServer) -> int:
    assert server.server.metrics_port > 0
    return server.server.metrics_port


@pytest.fixture()
def stub(server: RunningServer) -> Iterator[pb_grpc.RouterStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RouterStub(channel)


KEY = (("x-api-key", DEMO_KEY),)


def route(
    stub: pb_grpc.RouterStub, text: str, app: str = "storefront", **metadata: str
) -> pb.RouteDecision:
    request = pb.RouteRequest(app=app, text=text, metadata=metadata)
    return stub.Route(request, metadata=KEY, timeout=20)


def orchestrate(stub: pb_grpc.RouterStub, text: str = DISPUTE) -> list[pb.OrchestrateEvent]:
    request = pb.OrchestrateRequest(request=pb.RouteRequest(app="storefront", text=text))
    return list(stub.Orchestrate(request, metadata=KEY, timeout=30))


# -- counting by value ---------------------------------------------------------------------------


def test_route_requests_stages_and_decisions_by_value(stub: pb_grpc.RouterStub, port: int) -> None:
    before = scrape(port)
    decisions = [route(stub, TEXTS[i % len(TEXTS)]) for i in range(18)]
    after = scrape(port)

    rpc = {"tenant": "retail", "app": "storefront", "rpc": "Route"}
    assert delta(before, after, "plexus_requests_total", **rpc, outcome="OK") == 18
    for name, count in Tally(d.route for d in decisions).items():
        assert delta(before, after, "plexus_requests_total", **rpc, route=name) == count
        assert delta(before, after, "plexus_decisions_total", tenant="retail", route=name) == count
    abstained = sum(d.abstained for d in decisions)
    assert delta(before, after, "plexus_decisions_total", abstained="true") == abstained
    assert delta(before, after, "plexus_decisions_total", abstained="false") == 18 - abstained
    assert delta(before, after, "plexus_decision_confidence_count", tenant="retail") == 18
    assert delta(before, after, "plexus_decision_confidence_sum") == pytest.approx(
        sum(d.confidence for d in decisions), rel=1e-5
    )
    assert delta(before, after, "plexus_request_duration_seconds_count", **rpc) == 18

    # every stage the responses name, counted once per request, at the microseconds they say
    stages: dict[str, list[int]] = {}
    for decision in decisions:
        for timing in decision.timings:
            stages.setdefault(timing.stage, []).append(timing.micros)
    assert {"prep", "pii", "route", "policy"} <= set(stages)
    for stage, micros in stages.items():
        labels = {"tenant": "retail", "stage": stage}
        assert delta(before, after, "plexus_stage_duration_seconds_count", **labels) == len(micros)
        assert delta(before, after, "plexus_stage_duration_seconds_sum", **labels) == pytest.approx(
            sum(micros) / 1e6, abs=1e-9
        )
        # each observation in its bucket: the cumulative counts grow by what the responses say
        for le, count in buckets(after, "plexus_stage_duration_seconds", **labels):
            was = dict(buckets(before, "plexus_stage_duration_seconds", **labels)).get(le, 0.0)
            assert count - was == sum(1 for m in micros if m / 1e6 <= le)


def test_histograms_are_well_formed(stub: pb_grpc.RouterStub, port: int) -> None:
    route(stub, TEXTS[0])
    samples = scrape(port)
    histograms = {n[: -len("_bucket")] for n, _ in samples if n.endswith("_bucket")}
    assert {"plexus_stage_duration_seconds", "plexus_request_duration_seconds"} <= histograms
    for name in histograms:
        series = {ls - {("le", dict(ls)["le"])} for n, ls in samples if n == f"{name}_bucket"}
        for labels in series:
            rows = sorted(
                (float(dict(ls)["le"]), v)
                for (n, ls), v in samples.items()
                if n == f"{name}_bucket" and ls - {("le", dict(ls)["le"])} == labels
            )
            counts = [v for _, v in rows]
            assert counts == sorted(counts)  # cumulative
            assert rows[-1][0] == math.inf
            assert samples[(f"{name}_count", labels)] == counts[-1]


def test_orchestrate_backends_tokens_and_cost_by_value(
    stub: pb_grpc.RouterStub, peer: OpenAIPeer, port: int
) -> None:
    before = scrape(port)
    peer.script(
        Behaviour(text="We will refund the duplicate charge."),
        Behaviour(status=503),  # retried: the second attempt answers
        Behaviour(text="Refund on its way."),
        Behaviour(status=500),  # not retryable: the chain falls back to policy-medium
    )
    finals = [orchestrate(stub)[-1].final for _ in range(3)]
    after = scrape(port)

    assert [f.backend for f in finals] == ["reasoning-large", "reasoning-large", "policy-medium"]
    answers = {"tenant": "retail", "outcome": "OK"}
    assert (
        delta(before, after, "plexus_backend_answers_total", **answers, backend="reasoning-large")
        == 2
    )
    assert (
        delta(before, after, "plexus_backend_answers_total", **answers, backend="policy-medium")
        == 1
    )
    assert delta(before, after, "plexus_backend_attempts_total", backend="reasoning-large") == 3
    assert delta(before, after, "plexus_backend_fallbacks_total", backend="reasoning-large") == 1
    assert delta(before, after, "plexus_backend_fallbacks_total", backend="policy-medium") == 0
    for backend in ("reasoning-large", "policy-medium"):
        mine = [f for f in finals if f.backend == backend]
        for kind, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
            assert delta(
                before, after, "plexus_tokens_total", tenant="retail", backend=backend, kind=kind
            ) == sum(getattr(f.usage, field) for f in mine)
        assert delta(before, after, "plexus_cost_total", backend=backend) == pytest.approx(
            sum(f.cost for f in mine), rel=1e-9
        )
        assert delta(
            before, after, "plexus_backend_first_token_seconds_count", backend=backend
        ) == len(mine)
    assert delta(before, after, "plexus_requests_total", rpc="Orchestrate", outcome="OK") == 3
    # the budget's window counted the spend
    assert total(after, "plexus_budget_limit", budget="daily", unit="cost") == 1000
    assert total(after, "plexus_budget_used", budget="daily", unit="cost") > 0


def test_an_answer_cut_off_is_counted_at_generate(
    stub: pb_grpc.RouterStub, peer: OpenAIPeer, port: int
) -> None:
    before = scrape(port)
    peer.script(Behaviour(text="one two three four five six", reset_after_chunks=2))
    events = orchestrate(stub)
    after = scrape(port)

    assert events[-1].error.code == "INTERRUPTED"
    assert (
        delta(
            before,
            after,
            "plexus_backend_answers_total",
            backend="reasoning-large",
            outcome="INTERRUPTED",
        )
        == 1
    )
    assert (
        delta(before, after, "plexus_request_errors_total", stage="generate", outcome="INTERRUPTED")
        == 1
    )
    assert (
        delta(before, after, "plexus_requests_total", rpc="Orchestrate", outcome="INTERRUPTED") == 1
    )


def test_refusals_by_stage_and_status(stub: pb_grpc.RouterStub, port: int) -> None:
    before = scrape(port)
    outcomes = []
    for _ in range(3):  # the first is admitted, the next two are over the per-user limit
        try:
            route(stub, "I was charged twice", app="case_desk", user="greedy")
            outcomes.append("OK")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)
    with pytest.raises(grpc.RpcError) as unknown:
        route(stub, "hello", app="no-such-app")
    after = scrape(port)

    assert outcomes == ["OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    desk = {"tenant": "retail", "app": "case_desk", "rpc": "Route"}
    assert delta(before, after, "plexus_requests_total", **desk, outcome="OK") == 1
    assert delta(before, after, "plexus_requests_total", **desk, outcome="RESOURCE_EXHAUSTED") == 2
    assert (
        delta(
            before,
            after,
            "plexus_request_errors_total",
            **desk,
            stage="policy",
            outcome="RESOURCE_EXHAUSTED",
        )
        == 2
    )
    # an app the tenant does not declare is counted, as (other), never by its name
    assert (
        delta(
            before,
            after,
            "plexus_request_errors_total",
            app="(other)",
            stage="prep",
            outcome="NOT_FOUND",
        )
        == 1
    )
    assert not any("no-such-app" in v for _, ls in after for _, v in ls)


def test_calls_refused_before_the_pipeline_are_counted(
    server: RunningServer, stub: pb_grpc.RouterStub, port: int
) -> None:
    before = scrape(port)
    with pytest.raises(grpc.RpcError) as unknown_key:
        stub.Route(
            pb.RouteRequest(app="storefront", text="hello"),
            metadata=(("x-api-key", "not-a-key"),),
            timeout=10,
        )
    with pytest.raises(grpc.RpcError) as empty:
        stub.RouteBatch(pb.RouteBatchRequest(), metadata=KEY, timeout=10)
    with grpc.insecure_channel(server.address) as channel:  # a message no parser accepts
        raw = channel.unary_unary("/plexus.v1.Router/Route")
        with pytest.raises(grpc.RpcError) as malformed:
            raw(b"\x12\x02\xff\xfe", metadata=KEY, timeout=10)
    after = scrape(port)

    assert unknown_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    refused = {"stage": "admission"}

    def refusals(tenant: str, rpc: str, outcome: str) -> float:
        labels = {**refused, "tenant": tenant, "rpc": rpc, "outcome": outcome}
        return delta(before, after, "plexus_request_errors_total", **labels)

    # an unknown key has no tenant: counted as (unknown)
    assert refusals("(unknown)", "Route", "UNAUTHENTICATED") == 1
    assert refusals("retail", "RouteBatch", "INVALID_ARGUMENT") == 1
    assert refusals("retail", "Route", "INVALID_ARGUMENT") == 1


def test_findings_by_kind_and_action(stub: pb_grpc.RouterStub, port: int) -> None:
    before = scrape(port)
    decision = route(stub, "my card 4111 1111 1111 1111 was charged twice, email jane@example.com")
    after = scrape(port)

    assert decision.findings, "the PII guard reports the card and the address"
    for (stage, kind, action), count in Tally(
        (f.stage, f.kind, f.action or "none") for f in decision.findings
    ).items():
        labels = {"tenant": "retail", "stage": stage, "kind": kind, "action": action}
        assert delta(before, after, "plexus_findings_total", **labels) == count


def test_state_read_at_scrape_time(server: RunningServer, port: int) -> None:
    samples = scrape(port)
    plexus = server.server.plexus
    for tenant, decider in plexus.deciders.tenants.items():
        assert (
            total(samples, "plexus_model_info", tenant=tenant, version=decider.active.version) == 1
        )
    for backend in plexus.backend_pools["retail"].backends:
        labels = {"tenant": "retail", "backend": backend}
        assert total(samples, "plexus_backend_breaker_state", **labels) == 1  # one state at a time
    policies = plexus.collections["retail"].get("policies")
    assert (
        total(
            samples,
            "plexus_collection_info",
            tenant="retail",
            collection="policies",
            version=policies.version,
        )
        == 1
    )
    assert total(samples, "plexus_collection_chunks", collection="policies") == policies.size
    assert total(samples, "plexus_build_info") == 1
    assert total(samples, "process_cpu_seconds_total") > 0


def test_openmetrics_when_asked_and_healthz(port: int) -> None:
    status, content_type, body = get(
        f"http://127.0.0.1:{port}/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")
    status, _, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 200 and json.loads(body) == {"status": "serving"}
    status, _, _ = get(f"http://127.0.0.1:{port}/nowhere")
    assert status == 404


ROOT = Path(__file__).resolve().parents[1]


def family_names(samples: Samples) -> set[str]:
    """Metric family names of a scrape (sample suffixes taken off)."""
    names = set()
    for name, _ in samples:
        for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        names.add(name)
    return names


def test_every_metric_is_documented_and_the_dashboard_queries_real_ones(port: int) -> None:
    exported = {n for n in family_names(scrape(port)) if n.startswith("plexus_")}
    docs = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`(plexus_[a-z_]+)`", docs))
    documented = {d.removesuffix("_total") for d in documented}
    assert exported - documented == set(), "every exported metric is in the reference"
    dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
    queried = {
        name.removesuffix("_bucket").removesuffix("_total")
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        for name in re.findall(r"plexus_[a-z_]+", target["expr"])
    }
    assert queried, "the dashboard has queries"
    drift = {n for n in queried if n.startswith("plexus_drift_")}  # only with drift measured
    assert queried - drift <= exported
    assert drift <= documented


def label_values(samples: Samples) -> set[tuple[str, str]]:
    return {pair for name, labels in samples if name.startswith("plexus_") for pair in labels}


def test_label_cardinality_is_bounded_under_a_thousand_users(
    stub: pb_grpc.RouterStub, server: RunningServer, port: int
) -> None:
    def users(first: int) -> None:
        for start in range(first, first + 1000, 250):
            batch = pb.RouteBatchRequest(
                requests=[
                    pb.RouteRequest(
                        app="storefront",
                        text=TEXTS[i % len(TEXTS)],
                        metadata={"user": f"user-{i}"},
                        request_id=f"req-{i}",
                    )
                    for i in range(start, start + 250)
                ]
            )
            stub.RouteBatch(batch, metadata=KEY, timeout=60)

    users(0)
    for i in range(50):  # undeclared apps, each a new name
        with pytest.raises(grpc.RpcError):
            route(stub, "hello", app=f"made-up-{i}")
    first = scrape(port)
    users(1000)
    for i in range(50, 100):
        with pytest.raises(grpc.RpcError):
            route(stub, "hello", app=f"made-up-{i}")
    second = scrape(port)

    series = lambda s: {k for k in s if k[0].startswith("plexus_")}  # noqa: E731
    assert series(second) == series(first)  # a thousand new users and apps: no new series
    assert (
        total(second, "plexus_requests_total", rpc="RouteBatch")
        - total(first, "plexus_requests_total", rpc="RouteBatch")
        == 1000
    )
    values = label_values(second)
    assert not any(v.startswith(("user-", "req-", "made-up-")) for _, v in values)
    tenants = server.server.plexus.loaded.config.tenants
    assert {v for k, v in values if k == "tenant"} <= {*tenants, "(unknown)"}
    assert {v for k, v in values if k == "app"} <= {a for t in tenants.values() for a in t.apps} | {
        "(other)"
    }
    routes = {r.name for t in tenants.values() for r in t.routes}
    assert {v for k, v in values if k == "route"} <= routes | {""}
    assert len(series(second)) < 3000


def test_a_breaker_that_opens_shows_at_once(
    stub: pb_grpc.RouterStub, peer: OpenAIPeer, port: int
) -> None:
    # last in this module: the breaker stays open for the rest of it
    peer.script(*[Behaviour(status=503)] * 4)
    for _ in range(2):  # two calls, two attempts each: four failures open it
        assert orchestrate(stub)[-1].final.backend == "policy-medium"
    samples = scrape(port)
    state = {"tenant": "retail", "backend": "reasoning-large"}
    assert total(samples, "plexus_backend_breaker_state", **state, state="open") == 1
    assert total(samples, "plexus_backend_breaker_state", **state, state="closed") == 0


# -- in process ----------------------------------------------------------------------------------


def test_metrics_are_off_without_an_address(trained_config) -> None:  # type: ignore[no-untyped-def]
    from router.plexus import Plexus

    plexus = Plexus(trained_config)
    try:
        assert plexus.metrics is None
        assert not any(isinstance(r, Metrics) for r in plexus.pipeline.recorders)
    finally:
        import asyncio

        asyncio.run(plexus.aclose())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"metrics_address": "nowhere"}, "server.metrics_address"),
        ({"tracing": {"exporter": "zipkin"}}, "server.tracing.exporter"),
        ({"tracing": {"sample_ratio": 1.5}}, "server.tracing.sample_ratio"),
        ({"log_format": "xml"}, "server.log_format"),
    ],
)
def test_bad_observability_settings_name_their_key(tmp_path, change, expected) -> None:  # type: ignore[no-untyped-def]
    data = demo_config_data(tmp_path)
    data["server"].update(change)
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        parse_config(data, tmp_path / "plexus.yaml")


def test_a_metric_at_its_series_cap_folds_new_values_into_other() -> None:
    counter = Counter("c_total", "c", ["user"], max_series=2)
    for value in ("a", "b", "c", "d", "a"):
        counter.inc((value,))
    assert counter.values() == {("a",): 2.0, ("b",): 1.0, ("(other)",): 2.0}
    assert counter.overflowed == 2
    histogram = Histogram("h", "h", ["x"], (1.0, 2.0), max_series=1)
    for value, x in ((0.5, "a"), (1.5, "b"), (3.0, "c")):
        histogram.observe((x,), value)
    assert histogram.series == {("a",): [1, 0, 0, 0.5], ("(other)",): [0, 1, 1, 4.5]}


def test_activity_keeps_the_last_window_of_buckets() -> None:
    activity = Activity()
    ten = 10_000_000_000
    activity.add(5 * ten, failed=False)
    activity.add(5 * ten + 1, failed=True)
    activity.add(7 * ten, failed=False)
    activity.add(6 * ten, failed=False)  # a clock that stepped back counts in the last bucket
    series = activity.series(now_ns=8 * ten)
    assert len(series) == 60 and series[-1] == (80, 0, 0)
    assert series[-4:-1] == [(50, 2, 1), (60, 0, 0), (70, 2, 0)]


BOUNDS = (0.001, 0.01, 0.1, 1.0, 10.0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 20.0, allow_nan=False), min_size=1, max_size=200),
    st.floats(0.01, 1.0),
)
def test_quantiles_land_in_the_bucket_of_the_exact_quantile(values: list[float], q: float) -> None:
    counts = [0] * (len(BOUNDS) + 1)
    for value in values:
        counts[bisect_left(BOUNDS, value)] += 1
    estimate = quantile(BOUNDS, counts, q)
    assert estimate is not None
    exact = sorted(values)[max(math.ceil(q * len(values)) - 1, 0)]  # the rank-th value
    index = bisect_left(BOUNDS, exact)
    lower = BOUNDS[index - 1] if index else 0.0
    upper = BOUNDS[index] if index < len(BOUNDS) else BOUNDS[-1]
    assert min(lower, upper) - 1e-12 <= estimate <= upper + 1e-12
    assert quantile(BOUNDS, counts, min(q + 0.1, 1.0)) >= estimate - 1e-12  # type: ignore[operator]
    assert quantile(BOUNDS, [0] * (len(BOUNDS) + 1), q) is None

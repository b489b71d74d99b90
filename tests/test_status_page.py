"""The operator page in a real browser: headless Chromium loads /status from a live server under
a little load; the numbers it shows are read from the DOM and checked against /metrics, and a
screenshot is saved (``PLEXUS_STATUS_SCREENSHOT=PATH`` also copies it there, which is how
``docs/status-page.png`` is made)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import grpc
import pytest

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.context.ingest import ingest

from .conftest import DEMO_KEY, KNOWLEDGE, OTHER_TENANT_KEY, RunningServer, context_config
from .test_observe_metrics import Samples, buckets, get, scrape, total

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)
TEXTS = [
    "where is my order 88123?",
    "is the red kettle in stock at store 77?",
    "tell me a joke about penguins",
    "what is the meaning of life",
    "I want to return these shoes",
    "what time does store #77 close on sunday",
]
WINDOW = (1400, 1300)


def chromium(tmp: Path, *args: str) -> str:
    """Run headless Chromium with a throwaway profile; its stdout."""
    assert CHROMIUM is not None
    profile = tmp / "chromium-profile"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class PageNumbers(HTMLParser):
    """The ``data-*`` values of the page, per tenant section."""

    def __init__(self) -> None:
        super().__init__()
        self.tenant = ""
        self.values: dict[str, dict[str, dict[str, str]]] = {}
        self.texts: dict[str, dict[str, str]] = {}
        self.scripts = 0
        self.external: list[str] = []
        self._kpi: str | None = None
        self._depth = 0
        self._child = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if a.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(a[key])
        if tag == "section" and "data-tenant" in a:
            self.tenant = a["data-tenant"]
        mine = self.values.setdefault(self.tenant, {})
        for key, value in a.items():
            if key.startswith("data-") and key != "data-value":
                mine.setdefault(key[5:], {})[value] = a.get("data-value", "")
        if "data-metric" in a:
            self._kpi, self._depth, self._child = a["data-metric"], 0, 0
        elif self._kpi is not None and tag == "div":
            self._depth += 1
            self._child += 1

    def handle_data(self, data: str) -> None:
        if self._kpi is not None and self._child == 2 and data.strip():  # label, then value
            self.texts.setdefault(self.tenant, {})[self._kpi] = data.strip()

    def handle_endtag(self, tag: str) -> None:
        if self._kpi is not None and tag == "div":
            if self._depth == 0:
                self._kpi = None
            else:
                self._depth -= 1


def histogram_quantile(rows: list[tuple[float, float]], q: float) -> float:
    """Prometheus's histogram_quantile over ``(le, cumulative)`` rows, written out again here."""
    count = rows[-1][1]
    rank = q * count
    previous_le, previous = 0.0, 0.0
    for le, cumulative in rows:
        if cumulative >= rank and cumulative > previous:
            if le == float("inf"):
                return previous_le
            return previous_le + (le - previous_le) * (rank - previous) / (cumulative - previous)
        previous_le, previous = le, cumulative
    return previous_le


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    def adjust(data: dict) -> None:
        data["server"]["metrics_address"] = "127.0.0.1:0"
        data["tenants"]["retail"]["policy"]["budgets"] = [
            {"name": "daily", "per": "tenant", "period": "day", "cost": 50}
        ]
        data["tenants"]["retail"]["policy"]["on_state_error"] = "fail_open"
        for tenant in data["tenants"].values():
            tenant["audit"] = {"enabled": False}

    loaded = context_config(tmp_path_factory.mktemp("status-page"), adjust)
    ingest(loaded, "retail", "policies", [KNOWLEDGE / "disputes.txt"])
    running = RunningServer(loaded)
    yield running
    running.stop()


class Load:
    """Route and Orchestrate calls from a thread until stopped (refusals are part of it)."""

    def __init__(self, address: str):
        self.address = address
        self.stop = threading.Event()
        self.sent = 0
        self.refused: dict[str, int] = {}
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _call(self, call, request, key) -> None:  # type: ignore[no-untyped-def]
        try:
            reply = call(request, metadata=(("x-api-key", key),), timeout=30)
            if not isinstance(reply, pb.RouteDecision):
                list(reply)  # a stream: read it to its end
        except grpc.RpcError as exc:
            name = exc.code().name
            self.refused[name] = self.refused.get(name, 0) + 1

    def _run(self) -> None:
        try:
            with grpc.insecure_channel(self.address) as channel:
                stub = pb_grpc.RouterStub(channel)
                i = 0
                while not self.stop.is_set():
                    text = TEXTS[i % len(TEXTS)]
                    if i % 9 == 4:
                        request = pb.OrchestrateRequest(
                            request=pb.RouteRequest(app="storefront", text=text), max_tokens=40
                        )
                        self._call(stub.Orchestrate, request, DEMO_KEY)
                    elif i % 13 == 7:  # an app the tenant does not have
                        self._call(stub.Route, pb.RouteRequest(app="nope", text=text), DEMO_KEY)
                    else:
                        request = pb.RouteRequest(app="storefront", text=text)
                        self._call(stub.Route, request, DEMO_KEY)
                    if i % 5 == 0:
                        request = pb.RouteRequest(app="buyers", text="bulk price")
                        self._call(stub.Route, request, OTHER_TENANT_KEY)
                    i += 1
                    self.sent += 1
        except BaseException as exc:  # noqa: BLE001 - raised again in the test's thread
            self.failure = exc

    def until(self, sent: int) -> None:
        """Wait until ``sent`` calls went out (raising what stopped the load, if anything)."""
        while self.sent < sent:
            if self.failure is not None or not self.thread.is_alive():
                raise AssertionError(f"the load stopped after {self.sent} calls: {self.failure!r}")
            threading.Event().wait(0.05)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert self.failure is None, self.failure
        assert set(self.refused) <= {"NOT_FOUND"}, self.refused  # only the made-up app


def test_the_page_shows_what_the_metrics_count(server: RunningServer, tmp_path: Path) -> None:
    port = server.server.metrics_port
    url = f"http://127.0.0.1:{port}/status"
    with Load(server.address) as load:
        load.until(60)
        under_load = PageNumbers()
        under_load.feed(chromium(tmp_path, "--dump-dom", url))  # it renders while serving
        assert set(under_load.values) >= {"retail", "wholesale"}
    page = PageNumbers()
    page.feed(chromium(tmp_path, "--dump-dom", url))
    samples: Samples = scrape(port)

    assert page.scripts == 0 and page.external == []
    for tenant in ("retail", "wholesale"):
        kpi = page.values[tenant]["metric"]
        number = lambda name: float(kpi[name])  # noqa: B023, E731
        requests = total(samples, "plexus_requests_total", tenant=tenant)
        ok = total(samples, "plexus_requests_total", tenant=tenant, outcome="OK")
        assert requests > 0 and number("requests") == requests
        assert number("errors") == requests - ok
        assert page.texts[tenant]["requests"] == f"{requests:,.0f}"
        decided = total(samples, "plexus_decisions_total", tenant=tenant)
        abstained = total(samples, "plexus_decisions_total", tenant=tenant, abstained="true")
        assert number("abstention-rate") == pytest.approx(abstained / decided, rel=1e-12)
        assert page.texts[tenant]["abstention-rate"] == f"{abstained / decided * 100:.1f}%"
        assert number("cost") == pytest.approx(
            total(samples, "plexus_cost_total", tenant=tenant), rel=1e-12
        )
        assert number("tokens") == total(samples, "plexus_tokens_total", tenant=tenant)
        rows = buckets(samples, "plexus_request_duration_seconds", tenant=tenant)
        for q in (50, 99):
            assert number(f"latency-p{q}") == pytest.approx(
                histogram_quantile(rows, q / 100), rel=1e-9
            )
        routes = page.values[tenant]["route"]
        expected = {}
        for (name, labels), value in samples.items():
            labels_ = dict(labels)
            if name == "plexus_decisions_total" and labels_["tenant"] == tenant and value:
                expected[labels_["route"]] = expected.get(labels_["route"], 0.0) + value
        assert {r: float(v) for r, v in routes.items()} == expected
        stages = page.values[tenant]["stage"]
        for stage, count in stages.items():
            assert float(count) == total(
                samples, "plexus_stage_duration_seconds_count", tenant=tenant, stage=stage
            )
        model = [
            dict(ls)["version"]
            for (n, ls), v in samples.items()
            if n == "plexus_model_info" and dict(ls)["tenant"] == tenant
        ]
        assert list(page.values[tenant]["model"]) == model
    retail = page.values["retail"]
    assert set(retail["breaker"]) == set(server.server.plexus.backend_pools["retail"].backends)
    assert "policies" in retail["collection"]
    drift = getattr(server.server.plexus, "drift", None)
    if drift is None:
        assert "none" in retail["drift"]  # "not measured"
    else:
        assert retail["drift"]


def test_a_screenshot_of_the_page(server: RunningServer, tmp_path: Path) -> None:
    port = server.server.metrics_port
    with Load(server.address) as load:
        load.until(120)
    shot = tmp_path / "status.png"
    chromium(
        tmp_path,
        f"--screenshot={shot}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"http://127.0.0.1:{port}/status?tenant=retail",
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == WINDOW
    assert len(data) > 20_000  # a page was drawn, not a blank window
    wanted = os.environ.get("PLEXUS_STATUS_SCREENSHOT")
    if wanted:
        shutil.copyfile(shot, wanted)


def test_one_tenant_or_a_clear_404(server: RunningServer) -> None:
    port = server.server.metrics_port
    status, content_type, body = get(f"http://127.0.0.1:{port}/status?tenant=wholesale")
    assert status == 200 and content_type.startswith("text/html")
    assert 'data-tenant="wholesale"' in body and 'data-tenant="retail"' not in body
    status, _, body = get(f"http://127.0.0.1:{port}/status?tenant=nobody")
    assert status == 404 and "no tenant 'nobody'" in body
    status, _, body = get(f"http://127.0.0.1:{port}/")
    assert status == 200 and "Plexus status" in body  # / leads to the page

"""The peers suite's parts: the chat client against a real OpenAI-compatible server, profile
reading, the no-context config, process trees, argument checks and the report.

The whole suite (model training, three servers, the LiteLLM proxy) is a benchmark run, not a
test; these cases check the pieces it is built from, each against real parts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import common
from bench.harness.adapters import ChatStream, chat_request
from bench.harness.clients import Job
from bench.instant_backend import InstantProtocol
from bench.peers import _levels, _modes, _targets, bare_config, chat_body, profile, render, systems
from router.config import load_config

# ----------------------------------------------------------------------------- the chat client


async def _run_chat(port: int, bodies: list[bytes], key: str | None = None) -> list:
    payloads = [chat_request(port, body, key) for body in bodies]
    job = Job("chat", "127.0.0.1", port, key or "", payloads, 1, len(payloads), 0, 0)
    stream = ChatStream(job, {})
    try:
        out = []
        for index in range(len(payloads)):
            out.append((await stream.run(index), dict(stream.last)))
        return out
    finally:
        await stream.close()


async def test_streamed_and_whole_answers_from_the_instant_backend() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(InstantProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        bodies = [chat_body("instant", "hi", True, None), chat_body("instant", "hi", False, None)]
        (streamed, s_last), (whole, w_last) = await _run_chat(port, bodies * 1)
    finally:
        server.close()
    started, first, final, error, _ = streamed
    assert error is None and started < first <= final
    assert s_last["content_events"] == 5  # the backend's five deltas
    assert s_last["pieces"] == 8  # five deltas, finish, usage, [DONE]: one HTTP chunk each
    assert s_last["body"].rstrip().endswith(b"data: [DONE]")
    assert whole[3] is None and whole[1] == 0  # a JSON answer has no first piece
    assert w_last["pieces"] == 1 and json.loads(w_last["body"])["choices"]


async def test_an_unknown_path_is_an_http_error_not_a_crash() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(InstantProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    job = Job(
        "chat", "127.0.0.1", port, "", [b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"], 1, 1, 0, 0
    )
    stream = ChatStream(job, {})
    try:
        outcome = await stream.run(0)
    finally:
        await stream.close()
        server.close()
    assert outcome[3] == "HTTP 404"


async def _faulty(reply: bytes) -> tuple[asyncio.Server, int]:
    """A test double for a broken peer: answers every request with ``reply`` (a fault the
    instant backend cannot produce on demand)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _chunked(*events: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + body


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (_chunked(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'), "no [DONE]"),
        (_chunked(b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n', b"data: [DONE]\n\n"),
         "no content"),
        (_chunked(b'data: {"error":{"message":"late"}}\n\n', b"data: [DONE]\n\n"), "error event"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
         "not a completion"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "ValueError"),
    ],
)  # fmt: skip
async def test_broken_replies_are_counted_as_errors(reply: bytes, error: str) -> None:
    server, port = await _faulty(reply)
    try:
        [(outcome, _)] = await _run_chat(port, [chat_body("m", "hi", True, None)])
    finally:
        server.close()
    assert outcome[3] == error


def test_the_request_carries_the_bearer_token_and_the_exact_body() -> None:
    body = chat_body("storefront", "when do you close", True, {"store_id": "1432"})
    request = chat_request(8080, body, "secret-key")
    head, _, sent = request.partition(b"\r\n\r\n")
    assert b"Authorization: Bearer secret-key" in head
    assert b"Content-Length: %d" % len(body) in head and sent == body
    assert json.loads(sent)["metadata"] == {"store_id": "1432"}
    assert b"Authorization" not in chat_request(8080, body)


# ----------------------------------------------------------------------------- profiles

COLLAPSED = """\
process 1;_run_module_as_main (<frozen runpy>:198);main (router/cli.py:373);BaseEventLoop._run_once (asyncio/base_events.py:1884);ChatFront._stream (router/server/http.py:280);_SelectorSocketTransport.write (asyncio/selector_events.py:1057);send (libc.so.6) 6
process 1;_run_module_as_main (<frozen runpy>:198);main (router/cli.py:373);BaseEventLoop._run_once (asyncio/base_events.py:1884);Pipeline._answer (router/pipeline.py:481);0x7f00 (libc.so.6) 3
process 1;_run_module_as_main (<frozen runpy>:198);main (router/cli.py:373);BaseEventLoop._run_once (asyncio/base_events.py:1884);EpollSelector.select (selectors.py:468);epoll_wait (libc.so.6) 30
process 1;Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81);PyThread_acquire_lock_timed (libpython3.11.so.1.0);0x7f01 (libc.so.6);0x7f02 (libc.so.6) 50
process 1;Thread.run (threading.py:982);AuditLog._write (router/observe/audit.py:700);fdatasync (libc.so.6) 9
process 1;0x7f03 (cygrpc.cpython-311-x86_64-linux-gnu.so);sendmsg (libc.so.6) 1
not a stack line
"""  # noqa: E501


def test_a_collapsed_profile_counts_busy_samples_only() -> None:
    stacks = profile.parse_collapsed(COLLAPSED.splitlines())
    assert sum(s.samples for s in stacks) == 99
    assert profile.busy_samples(stacks) == 10  # epoll, the lock wait and fdatasync are waits
    rows = {r.function: r for r in profile.top(stacks, 10)}
    assert rows["send (libc.so.6)"].own == pytest.approx(0.6)
    assert rows["send (libc.so.6)"].plexus_frame == "router/server/http.py:280 (ChatFront._stream)"
    assert rows["[libc.so.6]"].plexus_frame.startswith("router/pipeline.py:481")
    assert rows["sendmsg (libc.so.6)"].plexus_frame == ""  # the loop's own callback
    plexus = [r.function for r in profile.top(stacks, 10, "plexus")]
    assert plexus == ["ChatFront._stream (http.py)", "Pipeline._answer (pipeline.py)"]
    shares = profile.areas(stacks)
    assert shares["C library (system calls)"] == pytest.approx(1.0)


FRAMES = [
    "f (router/pipeline.py:1)",
    "g (aiohttp/client.py:2)",
    "h (asyncio/events.py:3)",
    "send (libc.so.6)",
    "epoll_wait (libc.so.6)",
    "0x7f00 (libc.so.6)",
    "k (grpc/_cython/cygrpc.so)",
]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.sampled_from(FRAMES), min_size=1, max_size=6), st.integers(1, 50)),
        min_size=1,
        max_size=20,
    )
)
def test_profile_shares_add_up(lines: list[tuple[list[str], int]]) -> None:
    text = [";".join(frames) + f" {count}" for frames, count in lines]
    stacks = profile.parse_collapsed(text)
    busy = profile.busy_samples(stacks)
    rows = profile.top(stacks, 10**6)
    if not busy:
        assert rows == [] and profile.areas(stacks) == {}
        return
    assert sum(r.own for r in rows) == pytest.approx(1.0)
    assert all(0 < r.total <= 1 and r.own <= r.total + 1e-12 for r in rows)
    assert sum(profile.areas(stacks).values()) == pytest.approx(1.0)
    for row in profile.top(stacks, 10**6, "plexus"):
        assert 0 < row.total <= 1


def test_py_spy_command_line() -> None:
    args = profile.command(Path("/x/py-spy"), 42, 9.6, Path("/o/p.txt"), True, True)
    assert args[:4] == ["/x/py-spy", "record", "--pid", "42"]
    assert "--native" in args and "--subprocesses" in args
    assert args[args.index("--duration") + 1] == "10"
    assert args[args.index("--format") + 1] == "raw"
    python = profile.command(Path("/x/py-spy"), 42, 3, Path("/o/p.txt"), False, False, 50)
    assert "--nonblocking" in python and "--gil" in python and "--native" not in python
    assert "--subprocesses" not in python and python[python.index("--rate") + 1] == "50"


# ----------------------------------------------------------------------------- configs, peers


def test_the_no_context_config_loads_and_has_no_context(tmp_path: Path) -> None:
    raw = yaml.safe_load(common.DEMO_CONFIG.read_text())
    model = raw["tenants"]["retail"]["model"]
    model["data"] = str(common.DEMO_CONFIG.parent / model["data"])
    retail = tmp_path / "plexus.yaml"
    retail.write_text(yaml.safe_dump(raw))
    bare = load_config(bare_config(retail))
    routes = bare.config.tenants["retail"].routes
    assert routes and all(route.context is None for route in routes)
    assert bare.config.server.audit_dir == tmp_path / "audit-bare"
    stock = load_config(retail).config.tenants["retail"].routes
    assert any(route.context is not None for route in stock)  # the copy is left as it was


def test_without_a_peer_environment_the_suite_says_how_to_make_one(tmp_path: Path) -> None:
    assert systems.find_peer(tmp_path) is None
    note = systems.how_to_install(tmp_path)
    assert "--install-peers" in note and str(tmp_path / "litellm") in note
    assert systems.PEER_SPEC in note


def test_the_peer_config_routes_one_model_to_the_backend() -> None:
    config = systems.litellm_config(4321, "sk-test")
    [model] = config["model_list"]  # type: ignore[misc]
    assert model["model_name"] == systems.PEER_MODEL
    assert model["litellm_params"]["api_base"] == "http://127.0.0.1:4321/v1"
    assert config["general_settings"] == {"master_key": "sk-test"}
    assert "database_url" not in json.dumps(config).lower()


def test_a_server_tree_counts_the_processes_it_started() -> None:
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        grandchild = int(process.stdout.readline())
        server = systems.Server("tree", process)  # type: ignore[arg-type]
        assert server.pids() == [process.pid, grandchild]
        assert set(server.watch()) == {"tree#0", "tree#1"}
        assert server.cpu_seconds() is not None
    finally:
        for pid in systems.children_of(process.pid):
            subprocess.run(["kill", str(pid)], check=False)
        process.kill()
        process.wait()


@pytest.mark.parametrize("text", ["", "0", "1,x", "-4"])
def test_bad_levels_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _levels(text)


def test_levels_and_systems_parse() -> None:
    assert _levels("1, 16,64,16") == [1, 16, 64]
    assert _targets("plexus-grpc,echo-route") == ["plexus-grpc", "echo-route"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown system"):
        _targets("plexus-grpc,nginx")
    assert _modes("gil,native,gil") == ["gil", "native"]
    with pytest.raises(argparse.ArgumentTypeError):
        _modes("perf")


# ----------------------------------------------------------------------------- the report


def _row(system: str, level: int, rps: float, p99: float, cpu: float) -> dict:
    return {
        "system": system,
        "concurrency": level,
        "requests": 100,
        "failures": 0,
        "errors": {},
        "error_examples": [],
        "rps": rps,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "p99_9_ms": p99,
        "mean_ms": p99 / 2,
        "ttft_p50_ms": p99 / 3,
        "server_cpu_us_per_call": cpu,
        "backend_cpu_us_per_call": 10.0,
        "round_rps": [rps, rps],
        "round_p50_ms": [p99 / 2],
        "latency_quantiles_ms": [p99 * q / 103 for q in range(103)],
    }


def _report() -> dict:
    results = [
        _row("litellm-sse", 16, 50.0, 500.0, 16_000.0),
        _row("plexus-http-sse", 16, 1100.0, 9.0, 450.0),
        _row("plexus-grpc", 16, 900.0, 12.0, 800.0),
        _row("plexus-route", 1, 1000.0, 1.0, 300.0),
        _row("echo-route", 1, 1200.0, 1.0, 100.0),
    ]
    names = [r["system"] for r in results]
    report = {
        "suite": "peers",
        "machine": {
            "date": "today",
            "cpu_model": "cpu",
            "cpu_cores": 2,
            "memory_gib": 1,
            "os": "os",
            "python": "3.11",
            "packages": {"plexus-router": "0"},
            "load_average_start": [1.0, 1.0, 1.0],
        },
        "load_average_per_level": {"16": [1.0, 1.0, 1.0]},
        "load_average_end": [1.0, 1.0, 1.0],
        "versions": {"plexus": "0", "python": "3.11", "peer": {"litellm": "1"}},
        "peer_note": None,
        "settings": {
            "config": "c",
            "app": "storefront",
            "levels": [1, 16],
            "requests_per_level": 100,
            "rounds": 2,
            "client_processes": 2,
            "plexus_workers": 1,
            "systems": [{"name": n, "what": n} for n in names],
            "order": "ABBA",
        },
        "models": {},
        "collections": {},
        "calibration": {},
        "idle_cpu_ms_per_s": {"bare": 1.0},
        "results": results,
        "profiles": [],
        "seconds": 1.0,
    }
    report["ratios"] = render.ratios(report)
    report["goals"] = render.goals(report)
    return report


def test_goals_are_judged_from_the_measured_rows() -> None:
    goals = {(g["goal"], g["system"]): g for g in _report()["goals"]}
    assert goals[("throughput ≥ 20× litellm-sse", "plexus-http-sse")]["met"] is True  # 22×
    assert goals[("throughput ≥ 20× litellm-sse", "plexus-grpc")]["met"] is False  # 18×
    assert goals[("p99 ≤ 1/50 of litellm-sse's", "plexus-http-sse")]["met"] is True
    assert goals[("server CPU ≤ 700 µs/call", "plexus-grpc")]["met"] is False
    assert goals[("server CPU ≤ 500 µs/call", "plexus-http-sse")]["met"] is True
    assert goals[("throughput ≥ 20× litellm-json", "plexus-http-json")]["met"] is None
    route = goals[("p50 ≤ 1.1× echo", "plexus-route")]
    assert route["met"] is True and route["value"] == pytest.approx(1.0)


def test_the_markdown_names_every_goal_and_system() -> None:
    report = _report()
    text = render.to_markdown(report)
    assert text.startswith("# Plexus against the LiteLLM proxy")
    assert "not measured" in text and "**missed**" in text
    for row in report["results"]:
        assert f"| {row['system']} |" in text


def test_the_plot_draws(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.report import save_plot

    path = tmp_path / "peers.png"
    assert save_plot(render.plot, _report(), path)
    assert path.stat().st_size > 10_000


def test_the_suite_is_listed() -> None:
    from bench.run import SUITES, build_parser

    assert "peers" in SUITES
    args = build_parser().parse_args(["peers", "--levels", "16", "--requests", "5"])
    assert args.levels == [16] and args.requests == 5 and not args.install_peers


def test_a_plexus_server_that_cannot_start_is_an_error_with_its_log(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("server: {address: 127.0.0.1:0}\ntenants: {}\nnot_a_key: 1\n")
    with pytest.raises(RuntimeError, match="plexus serve exited with status") as caught:
        systems.start_plexus("broken", config, 1, tmp_path)
    assert "not_a_key" in str(caught.value)

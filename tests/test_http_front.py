"""The OpenAI-compatible front door, driven by the official ``openai`` package (sync and async,
streaming and not), against a real server whose large model is the real OpenAI-protocol peer."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

import openai
import pytest

from router.context.ingest import ingest
from router.observe.audit import read_records

from .conftest import DEMO_KEY, KNOWLEDGE, OPS_ONLY_KEY, RunningServer, context_config
from .openai_peer import Behaviour, OpenAIPeer

DISPUTE = "you charged my card twice for one order and I want my money back"


@pytest.fixture(scope="module")
def peer():
    running = OpenAIPeer()
    yield running
    running.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, peer):
    def adjust(data: dict) -> None:
        data["server"]["http_address"] = "127.0.0.1:0"
        data["server"]["http_read_seconds"] = 1.0
        data["server"]["max_message_bytes"] = 64 * 1024
        retail = data["tenants"]["retail"]
        retail["backends"]["reasoning-large"] = {
            "kind": "openai",
            "url": peer.url,
            "model": "big-model",
            "retry": {"attempts": 1},
            "breaker": {"failures": 1000, "reset_seconds": 1},
            "price": {"input_per_1k": 3.0, "output_per_1k": 15.0},
        }
        retail["governance"] = {"pii": {"learned": False}}
        retail["policy"] = {
            "rules": [
                {
                    "name": "vip",
                    "when": {"metadata": {"tier": ["vip"]}},
                    "then": {"priority": "high"},
                }
            ],
            "rate_limits": [
                {
                    "name": "per-user",
                    "per": "user",
                    "apps": ["store_ops"],
                    "requests": {"rate": 1, "per_seconds": 3600, "burst": 1},
                }
            ],
            "on_state_error": "fail_open",
        }

    loaded = context_config(tmp_path_factory.mktemp("http"), adjust)
    ingest(loaded, "retail", "policies", [KNOWLEDGE / "disputes.txt"])
    ingest(loaded, "retail", "products", sorted(KNOWLEDGE.glob("*.jsonl")))
    running = RunningServer(loaded)
    yield running
    running.stop()


@pytest.fixture()
def base_url(served) -> str:
    return f"http://127.0.0.1:{served.server.http_port}/v1"


@pytest.fixture()
def client(base_url):
    with openai.OpenAI(base_url=base_url, api_key=DEMO_KEY, max_retries=0) as client:
        yield client


def test_a_completion_is_routed_stitched_and_answered(client, peer):
    peer.behaviour = Behaviour(text="We will refund the duplicate charge.")
    raw = client.chat.completions.with_raw_response.create(
        model="storefront",
        messages=[
            {"role": "system", "content": "You are the store's helpful assistant."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": DISPUTE},
        ],
        max_tokens=40,
        user="customer-7",
        metadata={"tier": "vip"},
    )
    completion = raw.parse()
    assert raw.headers["x-plexus-route"] == "customer_dispute"
    assert raw.headers["x-plexus-backend"] == "reasoning-large"
    assert raw.headers["x-plexus-model-version"].startswith("v")
    assert completion.choices[0].message.content.split() == peer.behaviour.text.split()
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens > 0
    extension = completion.model_extra["plexus"]
    assert extension["route"] == "customer_dispute" and extension["rules_applied"] == ["vip"]
    sent = peer.requests[-1].body
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "user", "assistant", "user"]  # the conversation went along
    assert "[1]" in sent["messages"][-1]["content"]  # ...with the stitched, cited prompt last
    assert sent["max_tokens"] == 40


def test_a_streamed_completion_arrives_in_chunks_with_usage(client, peer):
    peer.behaviour = Behaviour(text="one two three four five")
    stream = client.chat.completions.create(
        model="plexus/auto",
        messages=[{"role": "user", "content": DISPUTE}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["one", "two", "three", "four", "five"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    last = next(c for c in reversed(chunks) if c.choices)
    assert last.model_extra["plexus"]["backend"] == "reasoning-large"


def test_the_async_client_streams_and_not(base_url, peer):
    peer.behaviour = Behaviour(text="async answer here")

    async def both() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key=DEMO_KEY, max_retries=0) as c:
            whole = await c.chat.completions.create(
                model="storefront", messages=[{"role": "user", "content": DISPUTE}]
            )
            parts = []
            async for chunk in await c.chat.completions.create(
                model="storefront", messages=[{"role": "user", "content": DISPUTE}], stream=True
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            return whole.choices[0].message.content, "".join(parts)

    whole, streamed = asyncio.run(both())
    assert whole.split() == streamed.split() == ["async", "answer", "here"]


def test_earlier_turns_are_redacted_like_the_text(client, peer):
    client.chat.completions.create(
        model="storefront",
        messages=[
            {"role": "user", "content": "my email is jane.doe@example.com"},
            {"role": "user", "content": f"{DISPUTE}; write to jane.doe@example.com"},
        ],
    )
    sent = peer.requests[-1].body["messages"]
    assert "jane.doe@example.com" not in json.dumps(sent)
    assert "<EMAIL_1>" in sent[0]["content"] and "<EMAIL_1>" in sent[-1]["content"]


def test_models_lists_the_keys_apps(client, base_url):
    assert [m.id for m in client.models.list()][:2] == ["plexus/auto", "storefront"]
    with openai.OpenAI(base_url=base_url, api_key=OPS_ONLY_KEY, max_retries=0) as ops:
        assert [m.id for m in ops.models.list()] == ["plexus/auto", "store_ops"]


def test_errors_have_openai_shapes_and_statuses(client, base_url):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nowhere", messages=[{"role": "user", "content": "x"}])
    assert "not one of your apps" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="storefront", messages=[])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="storefront", messages=[{"role": "user", "content": "x" * 600}]
        )
    assert info.value.body["code"] == "invalid_argument"
    with openai.OpenAI(base_url=base_url, api_key=OPS_ONLY_KEY, max_retries=0) as ops:
        with pytest.raises(openai.PermissionDeniedError):
            ops.chat.completions.create(
                model="storefront", messages=[{"role": "user", "content": "hi"}]
            )
        ask = {
            "model": "store_ops",
            "messages": [{"role": "user", "content": "is the kettle in stock?"}],
            "metadata": {"store_id": "1432"},
        }
        ops.chat.completions.create(**ask, user="u-1")
        with pytest.raises(openai.RateLimitError) as info:
            ops.chat.completions.create(**ask, user="u-1")
        assert int(info.value.response.headers["Retry-After"]) >= 3599


def test_a_backend_failing_mid_stream_ends_with_an_error_event(client, peer):
    peer.script(Behaviour(text="one two three four five six", reset_after_chunks=3))
    stream = client.chat.completions.create(
        model="storefront", messages=[{"role": "user", "content": DISPUTE}], stream=True
    )
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "cut off" in info.value.message


def post(base_url: str, body: bytes, key: str = DEMO_KEY) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_bodies_are_bounded_and_the_server_keeps_serving(base_url, served, client):
    assert post(base_url, b"{not json")[0] == 400
    assert post(base_url, b'["a list"]')[0] == 400
    status, body = post(base_url, b'{"model": "storefront", "messages": "no"}')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(base_url, json.dumps({"x": "y" * 100_000}).encode())
    assert status == 413
    # A client that never sends the body it announced is cut off, not waited for.
    with socket.create_connection(("127.0.0.1", served.server.http_port), timeout=10) as slow:
        slow.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + DEMO_KEY.encode() + b"\r\nContent-Length: 500\r\n\r\n{"
        )
        reply = slow.recv(4096)
    assert b" 408 " in reply.split(b"\r\n", 1)[0]
    answer = client.chat.completions.create(
        model="storefront", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content
    # each refusal is in the tenant's audit trail, as a request that no stage ran for
    loaded = served.server.plexus.loaded
    trail = loaded.resolve(loaded.config.server.audit_dir) / "retail"
    records = [r for r in read_records(trail) if r["kind"] == "request"][-6:]
    assert [(r["rpc"], r["outcome"]) for r in records] == [
        *[("ChatCompletions", "INVALID_ARGUMENT")] * 4,
        ("ChatCompletions", "DEADLINE_EXCEEDED"),
        ("ChatCompletions", "OK"),
    ]


def test_a_traceparent_header_continues_the_callers_trace(client, peer):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    client.chat.completions.create(
        model="storefront",
        messages=[{"role": "user", "content": DISPUTE}],
        extra_headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    sent = peer.requests[-1].headers.get("traceparent", "")
    assert sent.split("-")[1] == trace_id  # the same trace reaches the backend

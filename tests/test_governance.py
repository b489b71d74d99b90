"""Governance end to end: a real server, a real OpenAI-protocol peer that records every body.

The retail tenant redacts structured PII, blocks SSNs, lets e-mail addresses through (so only a
backend certified for PII may receive them), refuses abstained intents in the store tools, and
checks answers in flight.
"""

from __future__ import annotations

import asyncio
import random
import threading
import uuid

import grpc
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.calls import Caller, RouteQuery
from router.config import LoadedConfig, parse_config
from router.context.ingest import ingest
from router.governance.guards import PLACEHOLDER, redact
from router.governance.output import RestorePlaceholders
from router.governance.rules import compile_rules
from router.pipeline import RequestState

from .conftest import ADMIN_KEY, DEMO_KEY, KNOWLEDGE, OPS_ONLY_KEY, RunningServer, context_config
from .openai_peer import Behaviour, OpenAIPeer

META = (("x-api-key", DEMO_KEY),)
DISPUTE = "you charged my card {card} twice for one order and I want my money back"
CARD = "4111 1111 1111 1111"

GOVERNANCE = {
    "pii": {
        "default_action": "redact",
        "actions": {"SSN": "block", "EMAIL": "allow"},
        "learned": False,
        "identifiers": [{"name": "LOYALTY", "pattern": r"LOY-\d{6}"}],
    },
    "apps": {"store_ops": {"refuse_abstained": True, "message": "Store tools answer store work."}},
    "output": {
        "window": 48,
        "rules": [
            {
                "kind": "commitment",
                "what": "amount",
                "max": 200,
                "action": "replace",
                "routes": ["customer_dispute"],
            },
            {"kind": "deny", "pattern": "(?i)internal use only", "action": "block"},
            {"kind": "deny", "pattern": "(?i)secret sauce", "action": "redact"},
            {"kind": "pii_leak", "action": "redact"},
            {"kind": "grounding", "action": "flag", "routes": ["returns"]},
        ],
    },
}


@pytest.fixture(scope="module")
def peer():
    running = OpenAIPeer()
    yield running
    running.close()


@pytest.fixture(scope="module")
def governed(tmp_path_factory, peer):
    def adjust(data: dict) -> None:
        retail = data["tenants"]["retail"]
        retail["backends"]["reasoning-large"] = {
            "kind": "openai",
            "url": peer.url,
            "model": "big-model",
            "timeout_seconds": 10,
            "retry": {"attempts": 1},
        }
        retail["governance"] = GOVERNANCE

    loaded = context_config(tmp_path_factory.mktemp("governance"), adjust)
    ingest(loaded, "retail", "policies", [KNOWLEDGE / "disputes.txt", KNOWLEDGE / "returns.md"])
    running = RunningServer(loaded)
    yield running
    running.stop()


@pytest.fixture()
def stub(governed):
    with grpc.insecure_channel(governed.address) as channel:
        yield pb_grpc.RouterStub(channel)


def orchestrate(stub, text: str, key: str = DEMO_KEY, app: str = "storefront"):
    request = pb.OrchestrateRequest(
        request=pb.RouteRequest(app=app, text=text, request_id=uuid.uuid4().hex)
    )
    return list(stub.Orchestrate(request, metadata=(("x-api-key", key),), timeout=30))


def answer(events) -> str:
    return "".join(e.delta for e in events if e.WhichOneof("event") == "delta")


def test_redaction_round_trip(stub, peer):
    peer.script(Behaviour(text="We refunded card <CARD_1> and noted it."))
    events = orchestrate(stub, DISPUTE.format(card=CARD))
    assert events[0].decision.route == "customer_dispute"
    sent = peer.requests[-1].body["messages"][-1]["content"]
    assert CARD not in sent and "<CARD_1>" in sent  # the backend sees the placeholder
    assert answer(events) == f"We refunded card {CARD} and noted it."  # the caller, the value
    findings = [(f.stage, f.kind, f.action) for f in events[-1].final.findings]
    assert ("pii", "CARD", "redact") in findings
    assert all(CARD not in f.detail for f in events[-1].final.findings)


def test_findings_reach_route_and_stitch(stub):
    decision = stub.Route(
        pb.RouteRequest(app="storefront", text=f"my card {CARD} was charged twice"),
        metadata=META,
        timeout=10,
    )
    assert [(f.kind, f.action) for f in decision.findings] == [("CARD", "redact")]
    reply = stub.Stitch(
        pb.StitchRequest(request=pb.RouteRequest(app="storefront", text=f"refund {CARD}")),
        metadata=META,
        timeout=20,
    )
    assert CARD not in reply.prompt and "<CARD_1>" in reply.prompt
    assert [f.kind for f in reply.decision.findings] == ["CARD"]


def test_blocked_pii_is_refused_without_the_value(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Route(
            pb.RouteRequest(app="storefront", text="my ssn is 123-45-6789, fix my account"),
            metadata=META,
            timeout=10,
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "SSN" in info.value.details() and "6789" not in info.value.details()


def test_certified_routing_skips_the_uncertified_backend(stub, peer):
    before = len(peer.requests)
    events = orchestrate(stub, DISPUTE.format(card="") + " write to jo@example.com")
    final = events[-1].final
    assert final.backend == "policy-medium"  # certified for pii; reasoning-large is not
    assert len(peer.requests) == before  # the raw address never reached the peer
    assert ("policy", "uncertified_backend", "skip") in [
        (f.stage, f.kind, f.action) for f in final.findings
    ]


def luhn_check_digit(payload: list[int]) -> int:
    total = 0
    for i, digit in enumerate(reversed(payload)):  # the digit left of the check one is doubled
        doubled = digit * 2 if i % 2 == 0 else digit
        total += doubled - 9 if doubled > 9 else doubled
    return (10 - total % 10) % 10


def test_no_raw_pii_reaches_an_uncertified_backend(governed, peer):
    """Thousands of generated requests: the peer's bodies never hold a raw value."""
    rng = random.Random(7)
    values = []
    for _ in range(60):
        payload = [4] + [rng.randrange(10) for _ in range(14)]
        card = "".join(map(str, payload)) + str(luhn_check_digit(payload))
        values.append(" ".join(card[i : i + 4] for i in range(0, 16, 4)))
        values.append(f"LOY-{rng.randrange(10**6):06d}")
        values.append(f"+44 20 7946 {rng.randrange(10**4):04d}")
    templates = [
        "you charged my card {v} twice for one order and I want my money back",
        "my refund for {v} never arrived, this is a billing dispute",
        "dispute: the charge on {v} is wrong, I was billed twice",
    ]
    plexus = governed.server.plexus
    caller = Caller("retail", "demo", admin=False, apps=None)
    peer.script(Behaviour(text="Noted."))
    start = len(peer.requests)

    async def one(text: str) -> None:
        async for _ in plexus.pipeline.orchestrate(caller, RouteQuery("storefront", text)):
            pass

    async def run_all() -> None:
        texts = [rng.choice(templates).format(v=rng.choice(values)) for _ in range(2000)]
        for i in range(0, len(texts), 16):
            await asyncio.gather(*(one(t) for t in texts[i : i + 16]))

    asyncio.run_coroutine_threadsafe(run_all(), governed.loop).result(600)
    bodies = [r.body["messages"][-1]["content"] for r in peer.requests[start:]]
    assert len(bodies) > 1000  # most of them were disputes answered by the peer
    for body in bodies:
        assert not any(value in body for value in values), body


def test_output_rules_over_split_deltas(stub, peer):
    peer.script(Behaviour(text="Sure, we will refund $150 today."))  # under the limit
    assert "$150" in answer(orchestrate(stub, DISPUTE.format(card="")))
    peer.script(Behaviour(text="Good news: we will refund $500 to you by Friday."))
    events = orchestrate(stub, DISPUTE.format(card=""))
    text = answer(events)
    assert "$500" not in text and "colleague" in text  # replaced before it was released
    assert "commitment" in [f.kind for f in events[-1].final.findings]
    peer.script(Behaviour(text="This note is for internal use only and must not leave."))
    events = orchestrate(stub, DISPUTE.format(card=""))
    assert events[-1].WhichOneof("event") == "error" and events[-1].error.code == "BLOCKED"
    assert "internal use" not in answer(events).lower()
    peer.script(Behaviour(text="Our secret sauce is patience, and also call 555-867-5309 now."))
    text = answer(orchestrate(stub, DISPUTE.format(card="")))
    assert "secret sauce" not in text and "[redacted]" in text
    assert "867-5309" not in text and "[PHONE]" in text  # PII the caller did not give


def test_app_refuses_abstained_intents(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Route(
            pb.RouteRequest(app="store_ops", text="what is the meaning of life"),
            metadata=(("x-api-key", OPS_ONLY_KEY),),
            timeout=10,
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "Store tools answer store work."


def test_reload_rules_while_serving(governed, stub):
    path = governed.server.plexus.loaded.path
    original = path.read_text()
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with grpc.insecure_channel(governed.address) as channel:
            router = pb_grpc.RouterStub(channel)
            while not stop.is_set():
                try:
                    router.Route(
                        pb.RouteRequest(app="storefront", text="where is my order"),
                        metadata=META,
                        timeout=10,
                    )
                except grpc.RpcError as exc:
                    failures.append(exc.code().name)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        with grpc.insecure_channel(governed.address) as channel:
            admin = pb_grpc.AdminStub(channel)
            meta = (("x-api-key", ADMIN_KEY),)
            data = yaml.safe_load(original)
            data["tenants"]["retail"]["governance"]["pii"]["actions"]["CARD"] = "block"
            path.write_text(yaml.safe_dump(data))
            admin.ReloadConfig(pb.ReloadConfigRequest(), metadata=meta, timeout=30)
            with pytest.raises(grpc.RpcError) as info:
                stub.Route(pb.RouteRequest(app="storefront", text=f"card {CARD}"), metadata=META)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            path.write_text(original.replace("default_action: redact", "default_action: nope"))
            with pytest.raises(grpc.RpcError) as info:
                admin.ReloadConfig(pb.ReloadConfigRequest(), metadata=meta, timeout=30)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "default_action" in info.value.details()
            with pytest.raises(grpc.RpcError):  # the rules in force kept serving
                stub.Route(pb.RouteRequest(app="storefront", text=f"card {CARD}"), metadata=META)
            with pytest.raises(grpc.RpcError) as info:
                admin.ReloadConfig(pb.ReloadConfigRequest(), metadata=META, timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            path.write_text(original)
            admin.ReloadConfig(pb.ReloadConfigRequest(), metadata=meta, timeout=30)
    finally:
        stop.set()
        worker.join(timeout=10)
        path.write_text(original)
    assert failures == []


def test_hostile_inputs_never_crash_or_leak(stub):
    hostile = [
        "x" * 400,
        f"{CARD}{CARD}{CARD}",  # adjacent entities
        "<CARD_1> is mine, and so is " + CARD,  # a placeholder the caller wrote
        "".join(chr(c) for c in range(0x20, 0x2FF)),
        "LOY-123456LOY-654321 4111111111111111",
    ]
    for text in hostile:
        try:
            decision = stub.Route(
                pb.RouteRequest(app="storefront", text=text), metadata=META, timeout=10
            )
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,), exc.details()
            continue
        assert decision.route


# -- redaction and restoring, without a server -----------------------------------------------


def _rules(tmp_path) -> object:
    from .conftest import demo_config_data

    data = demo_config_data(tmp_path)
    data["tenants"]["retail"]["governance"] = GOVERNANCE
    loaded: LoadedConfig = parse_config(data, tmp_path / "plexus.yaml")
    return compile_rules(loaded.config.tenants["retail"].governance, loaded).pii


def test_a_caller_placeholder_is_never_restored_into_a_value(tmp_path):
    rules = _rules(tmp_path)
    text = f"<CARD_1> and <CARD_2> are words I typed; my card is {CARD}"
    redacted, placeholders = redact(text, rules.detect(text), rules)
    assert list(placeholders) == ["<CARD_3>"] and placeholders["<CARD_3>"] == CARD
    assert redacted.startswith("<CARD_1> and <CARD_2>")
    assert {m.group(0) for m in PLACEHOLDER.finditer(redacted)} == {
        "<CARD_1>",
        "<CARD_2>",
        "<CARD_3>",
    }


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_restoring_is_the_same_however_the_answer_is_split(data):
    placeholders = {"<CARD_1>": CARD, "<EMAIL_12>": "a@b.co"}
    answer_text = data.draw(
        st.lists(st.sampled_from(["<CARD_1>", "<EMAIL_12>", " ", "ok", "<", ">", "_1"]))
    )
    text = "".join(answer_text)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    state = RequestState(Caller("t", "k", False, None), RouteQuery("a", "q"))
    state.placeholders = placeholders
    watch = RestorePlaceholders().watch(state)
    released = "".join(watch.feed(p) for p in pieces) + watch.flush()
    expected = text.replace("<CARD_1>", CARD).replace("<EMAIL_12>", "a@b.co")
    assert released == expected


def test_learned_spans_never_take_a_structural_match_s_place():
    from router.governance.rules import merge_spans
    from router.governance.types import Span

    structural = [Span("PHONE", 10, 22), Span("CARD", 40, 59)]
    learned = [Span("ADDRESS", 0, 35, 0.8), Span("PERSON", 58, 70, 0.9)]
    merged = merge_spans(structural, learned)
    assert [(s.kind, s.start, s.end) for s in merged] == [
        ("ADDRESS", 0, 10),
        ("PHONE", 10, 22),
        ("ADDRESS", 22, 35),
        ("CARD", 40, 59),
        ("PERSON", 59, 70),
    ]

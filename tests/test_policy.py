"""Policy rules: compiled matching, every action, order and ``continue``; explain; served."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.cli import main
from router.config import ConfigError, PolicyRuleConfig, parse_config
from router.context.ingest import ingest
from router.policy.rules import CompiledPolicy, PolicyFacts

from .conftest import (
    ADMIN_KEY,
    DEMO_KEY,
    KNOWLEDGE,
    RunningServer,
    context_config,
    demo_config_data,
)

ROUTES = ["customer_dispute", "returns", "store_hours", "escalate_to_human"]
DISPUTE = "you charged my card twice for one order and I want my money back"


def rules(*specs: dict) -> CompiledPolicy:
    return CompiledPolicy([PolicyRuleConfig.model_validate(s) for s in specs], ROUTES)


def facts(**overrides) -> PolicyFacts:  # type: ignore[no-untyped-def]
    base = dict(
        app="storefront",
        key="demo",
        metadata={"tier": "platinum", "region": "eu"},
        route="customer_dispute",
        confidence=0.8,
        abstained=False,
        findings=frozenset(),
    )
    return PolicyFacts(**(base | overrides))


def test_each_condition_matches_and_refuses():
    cases = [
        ({"apps": ["storefront"]}, {}, {"app": "store_ops"}),
        ({"keys": ["demo"]}, {}, {"key": "ops"}),
        ({"routes": ["customer_dispute"]}, {}, {"route": "returns"}),
        ({"metadata": {"tier": ["platinum", "gold"]}}, {}, {"metadata": {"tier": "guest"}}),
        ({"metadata": {"region": ["*"]}}, {}, {"metadata": {"tier": "gold"}}),
        ({"min_confidence": 0.5}, {}, {"confidence": 0.49}),
        ({"max_confidence": 0.5}, {"confidence": 0.5}, {"confidence": 0.51}),
        ({"abstained": True}, {"abstained": True}, {"abstained": False}),
        ({"findings": ["EMAIL", "CARD"]}, {"findings": frozenset({"CARD"})}, {}),
    ]
    for when, matching, failing in cases:
        policy = rules({"name": "r", "when": when, "then": {"priority": "high"}})
        assert policy.decide(facts(**matching)).applied == ["r"], when
        outcome, (trace,) = policy.explain(facts(**failing))
        assert outcome.applied == [] and not trace.matched and trace.reason, when


def test_first_match_wins_unless_it_says_continue():
    specs = [
        {"name": "large", "when": {"metadata": {"tier": ["platinum"]}}, "then": {"chain": ["a"]}},
        {"name": "cap", "then": {"max_tokens": 100, "chain": ["b"]}},
        {"name": "never", "then": {"priority": "low"}},
    ]
    outcome = rules(*specs).decide(facts())
    assert outcome.applied == ["large"] and outcome.chain == ("a",) and outcome.max_tokens is None
    specs[0]["continue"] = True
    outcome = rules(*specs).decide(facts())
    # the first value of an action holds; the cap is the second rule's
    assert outcome.applied == ["large", "cap"]
    assert outcome.chain == ("a",) and outcome.max_tokens == 100 and outcome.priority is None
    assert rules(*specs).decide(facts(metadata={})).applied == ["cap"]


def test_caps_take_the_smallest_and_deny_stops_everything():
    policy = rules(
        {"name": "a", "then": {"max_tokens": 300, "context_budget_tokens": 200}, "continue": True},
        {"name": "b", "then": {"max_tokens": 100, "context_budget_tokens": 400}, "continue": True},
        {"name": "no", "when": {"apps": ["store_ops"]}, "then": {"deny": "not here"}},
        {"name": "after", "then": {"priority": "low"}},
    )
    outcome = policy.decide(facts())
    assert (outcome.max_tokens, outcome.context_budget_tokens) == (100, 200)
    assert outcome.applied == ["a", "b", "after"]
    outcome, traces = policy.explain(facts(app="store_ops"))
    assert outcome.deny == "not here" and outcome.denied_by == "no"
    assert [t.reason for t in traces] == [
        "applied, continue",
        "applied, continue",
        "applied, stop",
        "not reached",
    ]


def test_rules_are_indexed_by_route():
    policy = rules(
        {
            "name": "disputes",
            "when": {"routes": ["customer_dispute"]},
            "then": {"priority": "high"},
        },
        {"name": "all", "then": {"priority": "low"}},
    )
    assert [r.name for r in policy.by_route["returns"]] == ["all"]
    assert [r.name for r in policy.by_route["customer_dispute"]] == ["disputes", "all"]
    assert policy.decide(facts(route="returns")).priority == "low"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"name": "r", "then": {"chain": ["nowhere"]}}, "policy.rules.0.then.chain: unknown"),
        ({"name": "r", "then": {"escalate_to": "nowhere"}}, "then.escalate_to: 'nowhere'"),
        ({"name": "r", "when": {"apps": ["nope"]}, "then": {}}, "policy.rules.0.when.apps"),
        ({"name": "r", "when": {"routes": ["nope"]}, "then": {}}, "when.routes: unknown"),
        (
            {"name": "r", "then": {"chain": ["policy-medium"], "escalate_to": "returns"}},
            "exclude each other",
        ),
    ],
)
def test_rules_are_checked_at_load(tmp_path, rule, message):
    data = demo_config_data(tmp_path)
    data["tenants"]["retail"]["policy"] = {"rules": [rule]}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", ".")):
        parse_config(data, tmp_path / "plexus.yaml")


def test_limits_need_an_explicit_choice_for_when_the_store_fails(tmp_path):
    data = demo_config_data(tmp_path)
    data["tenants"]["retail"]["policy"] = {
        "rate_limits": [{"name": "u", "per": "user", "requests": {"rate": 5}}]
    }
    with pytest.raises(ConfigError, match="on_state_error"):
        parse_config(data, tmp_path / "plexus.yaml")


# -- served --------------------------------------------------------------------------------------

SERVED_RULES = [
    {
        "name": "platinum-large",
        "when": {"routes": ["customer_dispute"], "metadata": {"tier": ["platinum"]}},
        "then": {"chain": ["reasoning-large", "policy-medium"], "priority": "high"},
        "continue": True,
    },
    {
        "name": "guests-medium",
        "when": {"routes": ["customer_dispute"], "metadata": {"tier": ["guest"]}},
        "then": {"chain": ["policy-medium"], "max_tokens": 5},
    },
    {
        "name": "banned-region",
        "when": {"metadata": {"region": ["nowhere"]}},
        "then": {"deny": "not served in this region"},
    },
    {
        "name": "angry-to-people",
        "when": {"metadata": {"channel": ["phone"]}, "routes": ["customer_dispute"]},
        "then": {"escalate_to": "escalate_to_human"},
    },
    {"name": "short-everywhere", "then": {"max_tokens": 400}},
]


def with_rules(data: dict) -> None:
    data["tenants"]["retail"]["policy"] = {"rules": SERVED_RULES}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    loaded = context_config(tmp_path_factory.mktemp("policy"), with_rules)
    ingest(loaded, "retail", "policies", [KNOWLEDGE / "disputes.txt"])
    running = RunningServer(loaded)
    yield running, loaded
    running.stop()


@pytest.fixture()
def stub(served):
    with grpc.insecure_channel(served[0].address) as channel:
        yield pb_grpc.RouterStub(channel)


def orchestrate(stub, text: str, **metadata: str):  # type: ignore[no-untyped-def]
    sent = pb.RouteRequest(
        app="storefront", text=text, metadata=metadata, request_id=uuid.uuid4().hex
    )
    request = pb.OrchestrateRequest(request=sent)
    return list(stub.Orchestrate(request, metadata=(("x-api-key", DEMO_KEY),), timeout=30))


def route(stub, text: str, **metadata: str) -> pb.RouteDecision:
    request = pb.RouteRequest(app="storefront", text=text, metadata=metadata)
    return stub.Route(request, metadata=(("x-api-key", DEMO_KEY),), timeout=20)


def test_the_chain_follows_the_tier_and_events_say_which_rules_applied(stub):
    events = orchestrate(stub, DISPUTE, tier="platinum")
    decision, final = events[0].decision, events[-1].final
    assert decision.route == "customer_dispute" and decision.priority == "high"
    assert list(decision.rules_applied) == ["platinum-large", "short-everywhere"]
    assert final.backend == "reasoning-large"
    assert list(final.rules_applied) == ["platinum-large", "short-everywhere"]

    events = orchestrate(stub, DISPUTE, tier="guest")
    final = events[-1].final
    assert final.backend == "policy-medium" and list(final.rules_applied) == ["guests-medium"]
    assert final.usage.completion_tokens <= 5 and final.finish_reason == "length"

    decision = route(stub, DISPUTE)
    assert list(decision.rules_applied) == ["short-everywhere"] and decision.priority == ""


def test_deny_is_permission_denied_and_escalation_changes_the_route(stub):
    with pytest.raises(grpc.RpcError) as info:
        route(stub, DISPUTE, region="nowhere")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "banned-region" in info.value.details() and "not served" in info.value.details()

    events = orchestrate(stub, DISPUTE, channel="phone")
    decision = events[0].decision
    assert decision.route == "escalate_to_human" and decision.target == "human-queue"
    assert list(decision.rules_applied) == ["angry-to-people"]
    assert any(f.kind == "escalated" for f in decision.findings)
    assert events[-1].final.backend == "human-queue"


def test_reload_swaps_the_rules_and_refuses_backend_changes(stub, served):
    _, loaded = served
    admin = pb_grpc.AdminStub(grpc.insecure_channel(served[0].address))
    meta = (("x-api-key", ADMIN_KEY),)
    original = loaded.path.read_text()
    try:
        data = yaml.safe_load(original)
        data["tenants"]["retail"]["policy"]["rules"] = [
            {"name": "all-denied", "then": {"deny": "closed for maintenance"}}
        ]
        loaded.path.write_text(yaml.safe_dump(data))
        reply = admin.ReloadConfig(pb.ReloadConfigRequest(), metadata=meta, timeout=60)
        assert "policy" in reply.message
        with pytest.raises(grpc.RpcError) as info:
            route(stub, DISPUTE)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

        data["tenants"]["retail"]["backends"]["extra"] = {"kind": "local"}
        loaded.path.write_text(yaml.safe_dump(data))
        with pytest.raises(grpc.RpcError) as info:
            admin.ReloadConfig(pb.ReloadConfigRequest(), metadata=meta, timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "backends" in info.value.details()
    finally:
        loaded.path.write_text(original)
        admin.ReloadConfig(pb.ReloadConfigRequest(), metadata=meta, timeout=60)
    assert list(route(stub, DISPUTE).rules_applied) == ["short-everywhere"]


def explain(loaded, meta: str) -> int:  # type: ignore[no-untyped-def]
    argv = ["policy", "explain", str(loaded.path), "--tenant", "retail", "--app", "storefront"]
    return main([*argv, "--text", DISPUTE, "--meta", meta])


def test_explain_prints_the_outcome_and_why(served, capsys):
    _, loaded = served
    code = explain(loaded, "tier=guest")
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decision"]["route"] == "customer_dispute"
    verdicts = {r["rule"]: r for r in report["rules"]}
    assert not verdicts["platinum-large"]["matched"]
    assert "'guest' is not one of ['platinum']" in verdicts["platinum-large"]["why"]
    assert verdicts["guests-medium"]["matched"] and verdicts["short-everywhere"]["why"] == (
        "not reached"
    )
    assert report["outcome"]["chain"] == ["policy-medium"] and report["outcome"]["max_tokens"] == 5
    assert report["outcome"]["refused"] is None

    assert explain(loaded, "region=nowhere") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outcome"]["refused"].startswith("PERMISSION_DENIED")
    assert explain(loaded, "tier") == 2


values = st.sampled_from(["platinum", "gold", "guest", "eu", "us", ""])
when_strategy = st.fixed_dictionaries(
    {},
    optional={
        "apps": st.lists(st.sampled_from(["storefront", "store_ops"]), max_size=2),
        "keys": st.lists(st.sampled_from(["demo", "ops"]), max_size=2),
        "routes": st.lists(st.sampled_from(ROUTES), max_size=3),
        "metadata": st.dictionaries(
            st.sampled_from(["tier", "region"]), st.lists(values | st.just("*"), max_size=3)
        ),
        "min_confidence": st.floats(0, 1),
        "max_confidence": st.floats(0, 1),
        "abstained": st.booleans(),
        "findings": st.lists(st.sampled_from(["EMAIL", "CARD", "prompt_injection"]), max_size=2),
    },
)
facts_strategy = st.builds(
    PolicyFacts,
    app=st.sampled_from(["storefront", "store_ops"]),
    key=st.sampled_from(["demo", "ops"]),
    metadata=st.dictionaries(st.sampled_from(["tier", "region"]), values),
    route=st.sampled_from(ROUTES),
    confidence=st.floats(0, 1),
    abstained=st.booleans(),
    findings=st.frozensets(st.sampled_from(["EMAIL", "CARD", "prompt_injection"])),
)


@settings(max_examples=300, deadline=None)
@given(when=when_strategy, seen=facts_strategy)
def test_the_fast_match_agrees_with_the_explained_one(when, seen):
    (rule,) = rules({"name": "r", "when": when, "then": {}}).rules
    assert rule.matches(seen) == (rule.mismatch(seen) is None)

"""The calibration rule: per-tenant targets, every threshold considered, one rule two forms.

``operating_points`` (sorted searches) must report what ``evaluate`` reports at every
threshold; ``calibrate`` must land where an exhaustive search over the same thresholds lands.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score

from router.config import ConfigError, load_config
from router.routing.metrics import evaluate, macro_f1, operating_points
from router.routing.training import (
    CalibrationRule,
    calibrate,
    candidate_thresholds,
    train_model,
)

from .test_training import PARAMS, small_examples

OOS = "oos"
LABELS = ["a", "b", "c", OOS]


@st.composite
def held_out(draw: st.DrawFn, with_oos: bool = True) -> tuple[np.ndarray, list[str]]:
    rows = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=draw(st.floats(0.1, 4.0)), size=(rows, len(LABELS)))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, draw(st.integers(1, 6)))  # ties between rows, and exact zeros
    choices = LABELS if with_oos else LABELS[:-1]
    truth = [choices[i] for i in rng.integers(0, len(choices), size=rows)]
    return probs.astype(np.float32), truth


@settings(max_examples=200, deadline=None)
@given(case=held_out(), extra=st.lists(st.floats(0.0, 1.0), max_size=5))
def test_operating_points_agree_with_evaluate(
    case: tuple[np.ndarray, list[str]], extra: list[float]
) -> None:
    probs, truth = case
    thresholds = np.concatenate([candidate_thresholds(probs[:, :3].max(axis=1)), extra])
    points = operating_points(probs, truth, LABELS, OOS, thresholds)
    for i, t in enumerate(thresholds):
        expected = evaluate(probs, truth, LABELS, OOS, float(t))
        assert points.inscope_accuracy[i] == pytest.approx(
            expected.get("inscope_accuracy", np.nan), nan_ok=True
        )
        assert points.oos_recall[i] == pytest.approx(
            expected.get("oos_recall", np.nan), nan_ok=True
        )


def exhaustive(probs: np.ndarray, truth: list[str], rule: CalibrationRule) -> tuple:
    """The best (score, recall) any candidate threshold reaches, by evaluating each one."""
    best = None
    points = []
    for t in candidate_thresholds(probs[:, :3].max(axis=1)):
        m = evaluate(probs, truth, LABELS, OOS, float(t))
        points.append((m["inscope_accuracy"], m["oos_recall"]))
    top_acc = max(acc for acc, _ in points)
    for acc, recall in points:
        if rule.target == "inscope_accuracy":
            score = acc if recall >= rule.min_oos_recall - 1e-12 else -np.inf
        elif rule.target == "oos_recall":
            score = recall if acc >= top_acc - rule.max_inscope_drop - 1e-12 else -np.inf
        else:
            score = -((1 - acc) + rule.oos_cost * (1 - recall))
        if best is None or (score, recall) > best:
            best = (score, recall)
    return best


rules = st.one_of(
    st.builds(CalibrationRule, target=st.just("inscope_accuracy"), min_oos_recall=st.floats(0, 1)),
    st.builds(CalibrationRule, target=st.just("oos_recall"), max_inscope_drop=st.floats(0, 0.2)),
    st.builds(CalibrationRule, target=st.just("cost"), oos_cost=st.floats(0.01, 50)),
)


@settings(max_examples=150, deadline=None)
@given(case=held_out(), rule=rules)
def test_the_rule_lands_where_an_exhaustive_search_lands(
    case: tuple[np.ndarray, list[str]], rule: CalibrationRule
) -> None:
    probs, truth = case
    if OOS not in truth or all(label == OOS for label in truth):
        return  # the rule without out-of-scope examples is tested below
    result = calibrate(probs, truth, LABELS, OOS, rule)
    assert 0.0 <= result.threshold <= 1.0
    landed = result.heldout
    assert landed == evaluate(probs, truth, LABELS, OOS, result.threshold)
    best_score, best_recall = exhaustive(probs, truth, rule)
    if rule.target == "inscope_accuracy" and best_score == -np.inf:
        # a confidence of exactly 1 is kept at every threshold: the floor may be out of reach
        assert not result.met and "unreachable" in result.how
        assert landed["oos_recall"] == pytest.approx(best_recall)
    elif rule.target == "inscope_accuracy":
        assert result.met
        assert landed["oos_recall"] >= rule.min_oos_recall - 1e-9
        assert landed["inscope_accuracy"] == pytest.approx(best_score)
    elif rule.target == "cost":
        cost = (1 - landed["inscope_accuracy"]) + rule.oos_cost * (1 - landed["oos_recall"])
        assert -cost == pytest.approx(best_score)
    else:
        assert landed["oos_recall"] == pytest.approx(best_score)
    assert len(result.curve) == 100


def test_the_default_rule_buys_only_the_recall_asked_for() -> None:
    labels = ["a", "b", OOS]
    # in-scope confidences 0.9, 0.8, 0.7, 0.6; out-of-scope 0.65, 0.5, 0.4, 0.3
    conf = [0.9, 0.8, 0.7, 0.6, 0.65, 0.5, 0.4, 0.3]
    probs = np.array([[c, (1 - c) * 0.6, (1 - c) * 0.4] for c in conf], dtype=np.float32)
    truth = ["a"] * 4 + [OOS] * 4
    half = calibrate(probs, truth, labels, OOS, CalibrationRule(min_oos_recall=0.5))
    assert half.heldout["inscope_accuracy"] == 1.0 and half.heldout["oos_recall"] == 0.75
    assert 0.5 < half.threshold < 0.6
    most = calibrate(probs, truth, labels, OOS, CalibrationRule(min_oos_recall=1.0))
    assert most.heldout["oos_recall"] == 1.0 and most.heldout["inscope_accuracy"] == 0.75
    assert 0.65 < most.threshold < 0.7
    cheap = calibrate(probs, truth, labels, OOS, CalibrationRule(target="cost", oos_cost=0.01))
    assert cheap.heldout["inscope_accuracy"] == 1.0
    assert "oos recall >= 0.5" in half.how


def test_without_out_of_scope_examples_most_correct_decisions_are_kept() -> None:
    labels = ["a", "b", OOS]
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.4, 0.0], [0.3, 0.6, 0.1]])
    result = calibrate(probs, ["a", "b", "a", "b"], labels, OOS, CalibrationRule(keep_correct=1.0))
    assert result.threshold == pytest.approx(0.6)
    assert result.heldout["inscope_accuracy"] == 1.0
    assert "no out-of-scope examples" in result.how


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "speed"}, "not one of"),
        ({"min_oos_recall": 1.5}, "min_oos_recall"),
        ({"oos_cost": 0.0}, "oos_cost"),
    ],
)
def test_bad_rules_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CalibrationRule(**kwargs)


def test_the_model_file_says_where_its_rule_landed() -> None:
    rule = CalibrationRule(target="cost", oos_cost=2.0)
    trained = train_model(
        small_examples(), featurizer_params=PARAMS, seed=1, heldout_fraction=0.4, calibration=rule
    )
    import json

    stored = json.loads(trained.card.extra["plexus.calibration"])
    assert stored["rule"] == rule.to_dict()
    assert stored["threshold"] == trained.card.threshold == trained.calibration.threshold
    assert stored["heldout"]["inscope_accuracy"] == trained.card.metrics["inscope_accuracy"]
    fixed = train_model(
        small_examples(), featurizer_params=PARAMS, seed=1, heldout_fraction=0.4, threshold=0.42
    )
    assert fixed.card.threshold == 0.42 and "fixed by the configuration" in fixed.calibration.how


def config_with(tmp_path: Path, model: dict) -> Path:
    data = {
        "tenants": {
            "t": {
                "api_keys": [{"name": "k", "sha256": "0" * 64}],
                "apps": {"a": {}},
                "model": {"fallback_route": "r1", **model},
                "routes": [
                    {"name": "r1", "target": "x", "examples": ["one"]},
                    {"name": "r2", "target": "x", "examples": ["two"]},
                ],
            }
        }
    }
    path = tmp_path / "plexus.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_configuration_takes_a_target_per_tenant(tmp_path: Path) -> None:
    loaded = load_config(
        config_with(tmp_path, {"calibration": {"target": "oos_recall", "max_inscope_drop": 0.01}})
    )
    calibration = loaded.tenant("t").model.calibration
    assert (calibration.target, calibration.max_inscope_drop) == ("oos_recall", 0.01)
    older = load_config(config_with(tmp_path, {"inscope_tolerance": 0.05}))
    assert older.tenant("t").model.calibration.target == "oos_recall"
    assert older.tenant("t").model.calibration.max_inscope_drop == 0.05
    default = load_config(config_with(tmp_path, {})).tenant("t").model.calibration
    assert (default.target, default.min_oos_recall) == ("inscope_accuracy", 0.6)
    with pytest.raises(ConfigError, match="calibration"):
        load_config(config_with(tmp_path, {"calibration": {"target": "speed"}}))
    with pytest.raises(ConfigError, match="not both"):
        load_config(config_with(tmp_path, {"inscope_tolerance": 0.1, "calibration": {}}))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_macro_f1_over_given_labels_matches_scikit_learn(data: st.DataObject) -> None:
    truth = data.draw(st.lists(st.sampled_from(LABELS), min_size=1, max_size=30))
    predicted = data.draw(
        st.lists(st.sampled_from([*LABELS, "d"]), min_size=len(truth), max_size=len(truth))
    )
    labels = data.draw(st.lists(st.sampled_from(LABELS[:3]), min_size=1, unique=True))
    expected = f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)
    assert macro_f1(truth, predicted, labels) == pytest.approx(expected, abs=1e-12)


def test_abstentions_are_not_a_class_of_macro_f1() -> None:
    labels = ["a", "b", OOS]
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]])
    metrics = evaluate(probs, ["a", "b", "a"], labels, OOS, threshold=0.6)
    # a: tp 1, fn 1 -> 2/3; b: 1. An "abstained" class with F1 0 would pull this to 5/9.
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["answered"] == pytest.approx(2 / 3)

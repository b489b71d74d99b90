"""The abstain rule: its scalar (serving) and row (evaluation) forms agree; macro-F1."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score

from router.routing.metrics import abstains, decide_rows, evaluate, macro_f1

OOS = "oos"

# probabilities that tie often (exact repeats, and the endpoints) as well as arbitrary ones
probability = st.one_of(
    st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]),
    st.floats(0.0, 1.0, allow_nan=False, width=32),
    st.floats(0.0, 1.0, allow_nan=False),
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[np.ndarray, list[str], float]:
    """Rows of probabilities over labels with or without the oos label (possibly only it), and
    a threshold that is often exactly one of the probabilities."""
    in_scope = draw(st.integers(0, 5))
    labels = [f"route{i}" for i in range(in_scope)]
    if in_scope == 0 or draw(st.booleans()):
        labels.insert(draw(st.integers(0, in_scope)), OOS)
    rows = draw(st.integers(1, 6))
    values = draw(st.lists(probability, min_size=rows * len(labels), max_size=rows * len(labels)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    probs = np.array(values, dtype=dtype).reshape(rows, len(labels))
    threshold = draw(st.one_of(probability, st.sampled_from(values)))
    return probs, labels, threshold


def scalar_decision(row: list[float], labels: list[str], threshold: float) -> tuple[str, bool]:
    """One row decided the way serving decides a query: Python floats, the best in-scope
    label by ``heapq.nlargest`` (the first of equals), then :func:`abstains`."""
    allowed = [i for i, label in enumerate(labels) if label != OOS]
    ranked = heapq.nlargest(1, allowed, key=row.__getitem__)
    confidence = row[ranked[0]] if ranked else None
    oos_prob = row[labels.index(OOS)] if OOS in labels else 0.0
    abstained = abstains(confidence, oos_prob, threshold)
    return (OOS if abstained else labels[ranked[0]]), abstained


@settings(max_examples=500, deadline=None)
@given(cases())
def test_row_form_agrees_with_the_scalar_form(case: tuple[np.ndarray, list[str], float]) -> None:
    probs, labels, threshold = case
    decisions = decide_rows(probs, labels, OOS, threshold)
    expected = [scalar_decision(row, labels, threshold) for row in probs.tolist()]
    assert decisions.predicted == [label for label, _ in expected]
    assert decisions.abstained.tolist() == [abstained for _, abstained in expected]


def test_abstains_on_each_condition() -> None:
    assert abstains(None, 0.0, 0.0)  # no in-scope label
    assert abstains(0.4, 0.0, 0.5)  # under the threshold
    assert not abstains(0.5, 0.0, 0.5)  # at the threshold
    assert abstains(0.4, 0.45, 0.1)  # out-of-scope wins
    assert not abstains(0.45, 0.45, 0.1)  # a tie goes to the in-scope label


def test_rows_without_in_scope_labels_abstain() -> None:
    decisions = decide_rows(np.array([[1.0], [0.0]]), [OOS], OOS, 0.0)
    assert decisions.predicted == [OOS, OOS]
    assert decisions.abstained.tolist() == [True, True]


labels_drawn = st.lists(st.sampled_from(["a", "b", "c", OOS]), min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_macro_f1_matches_scikit_learn(data: st.DataObject) -> None:
    truth = data.draw(labels_drawn)
    predicted = data.draw(
        st.lists(
            st.sampled_from(["a", "b", "c", OOS, "d"]), min_size=len(truth), max_size=len(truth)
        )
    )
    expected = f1_score(truth, predicted, average="macro", zero_division=0)
    assert macro_f1(truth, predicted) == pytest.approx(expected, abs=1e-12)


def test_evaluate_counts_an_abstention_as_an_in_scope_error() -> None:
    labels = ["a", "b", OOS]
    probs = np.array([[0.9, 0.05, 0.05], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]])
    metrics = evaluate(probs, ["a", OOS, "b", "a"], labels, OOS, threshold=0.6)
    assert metrics["inscope_accuracy"] == pytest.approx(2 / 3)  # the last row abstains
    assert metrics["oos_recall"] == 1.0
    assert metrics["oos_precision"] == 0.5
    assert metrics["examples"] == 4.0

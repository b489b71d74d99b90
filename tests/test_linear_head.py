"""The linear head, natively and in numpy, agrees with onnxruntime on the same model file.

Behaviour tests run once per implementation (the ``implementation`` fixture), each checked
against onnxruntime running the file's graph; the property test that the native kernel equals
the numpy reference skips when the extension is not built.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from router._native import NO_EXTENSIONS
from router.routing import model
from router.routing.featurizer import FeaturizerParams
from router.routing.linear_head_ref import linear_head_probs as reference_probs
from router.routing.model import Classifier, ModelCard, build_linear_onnx, quantize_rows

NATIVE_MODULE = "router._native.linear_head"

HeadProbs = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


@pytest.fixture(scope="module")
def head_probs(implementation: str) -> HeadProbs:
    """``linear_head_probs`` of the implementation under test."""
    if implementation == "native":
        from router._native.linear_head import linear_head_probs

        return linear_head_probs
    return reference_probs


def make_model(
    buckets_log2: int, classes: int, seed: int, sparsity: float, int8: bool = False
) -> bytes:
    rng = np.random.default_rng(seed)
    params = FeaturizerParams(buckets_log2=buckets_log2)
    weights = rng.normal(scale=3.0, size=(params.buckets, classes)).astype(np.float32)
    weights[rng.random(params.buckets) < sparsity] = 0.0  # rows training never touched
    card = ModelCard(
        family="fast",
        labels=[f"r{i}" for i in range(classes)],
        oos_label="",
        featurizer=params,
        threshold=0.5,
        metrics={},
        encoder=None,
        training_data_sha256="0" * 64,
        created_at="2026-01-01T00:00:00+00:00",
    )
    return build_linear_onnx(weights, rng.normal(size=classes).astype(np.float32), card, int8=int8)


def padded_ids(pad: int, max_side: int = 300) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(
        np.int64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=max_side),
        elements=st.integers(0, pad),
    )


# -- behaviour, once per implementation ---------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    buckets_log2=st.integers(1, 12),
    classes=st.integers(2, 40),
    seed=st.integers(0, 2**16),
    sparsity=st.floats(0.0, 1.0),
    int8=st.booleans(),
    data=st.data(),
)
def test_agrees_with_onnxruntime(
    head_probs: HeadProbs,
    buckets_log2: int,
    classes: int,
    seed: int,
    sparsity: float,
    int8: bool,
    data,
):
    """Both graphs (float32 rows, int8 rows with a scale each) against onnxruntime."""
    model_bytes = make_model(buckets_log2, classes, seed, sparsity, int8)
    served = Classifier(model_bytes, "n")
    onnxruntime = Classifier(model_bytes, "o", native_head=False)
    assert served.native_head is not None and onnxruntime.native_head is None
    head = served.native_head
    ids = data.draw(padded_ids(head.pad_id))
    expected, _ = onnxruntime.predict(ids)
    got = head_probs(ids, head.remap, head.weights, head.bias, head.pad_id, head.scales)
    assert got.dtype == np.float32 and got.shape == (ids.shape[0], classes)
    # both accumulate in float32, in different orders
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
    served_probs, _ = served.predict(ids)
    np.testing.assert_allclose(served_probs, expected, rtol=1e-3, atol=1e-5)


def test_rows_of_padding_only_give_the_softmax_of_the_bias(head_probs: HeadProbs):
    bias = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    weights = np.ones((5, 3), dtype=np.float32)
    remap = np.array([1, 2, 3, 4, 0], dtype=np.int64)  # the pad id maps to row 0
    weights[0] = 0.0
    expected = np.exp(bias - bias.max()) / np.exp(bias - bias.max()).sum()
    for ids in (np.full((2, 4), 4, dtype=np.int64), np.zeros((3, 0), dtype=np.int64)):
        probs = head_probs(ids, remap, weights, bias, 4)
        np.testing.assert_allclose(probs, np.broadcast_to(expected, probs.shape), rtol=1e-6)
    assert head_probs(np.zeros((0, 7), dtype=np.int64), remap, weights, bias, 4).shape == (0, 3)


@pytest.mark.parametrize("bad", [-1, 2**12 + 1, 2**40])
def test_ids_outside_the_buckets_are_refused(head_probs: HeadProbs, bad: int):
    classifier = Classifier(make_model(12, 3, 0, 0.5), "n")
    ids = np.array([[1, 2, bad]], dtype=np.int64)
    head = classifier.native_head
    assert head is not None
    with pytest.raises(ValueError, match="outside"):
        head_probs(ids, head.remap, head.weights, head.bias, head.pad_id, head.scales)
    with pytest.raises(ValueError, match="outside"):
        classifier.predict(ids)


def test_accurate_and_foreign_graphs_run_in_onnxruntime():
    from router.routing.training import train_model

    from .test_training import small_examples

    trained = train_model(
        small_examples(),
        family="accurate",
        seed=0,
        heldout_fraction=0.4,
        featurizer_params=FeaturizerParams(buckets_log2=10),
    )
    assert Classifier(trained.model_bytes, "a").native_head is None


def test_the_served_head_follows_the_switch():
    from router.routing.linear_head_ref import LinearHead as ReferenceHead

    if NO_EXTENSIONS:
        assert model._LinearHead is ReferenceHead
        return
    try:
        from router._native.linear_head import LinearHead
    except ImportError:
        assert model._LinearHead is ReferenceHead
    else:
        assert model._LinearHead is LinearHead


@pytest.mark.parametrize("kind", ["native", "reference"])
def test_a_head_checks_its_tensors_once_and_refuses_bad_ids(
    kind: str, request: pytest.FixtureRequest
):
    from router.routing.linear_head_ref import LinearHead as ReferenceHead

    if kind == "native":
        request.getfixturevalue("native_available")
        from router._native.linear_head import LinearHead
    else:
        LinearHead = ReferenceHead  # noqa: N806
    remap = np.array([0, 1, 2, 2], dtype=np.int64)
    weights = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    bias = np.zeros(2, dtype=np.float32)
    head = LinearHead(remap, weights, bias, 3)
    ids = np.array([[0, 0, 3], [1, 3, 3]], dtype=np.int64)
    np.testing.assert_allclose(
        head.probs(ids), reference_probs(ids, remap, weights, bias, 3), rtol=1e-6
    )
    assert head.probs(np.zeros((0, 4), dtype=np.int64)).shape == (0, 2)
    with pytest.raises(ValueError, match="outside"):
        head.probs(np.array([[4]], dtype=np.int64))
    with pytest.raises(ValueError, match="remap has"):
        LinearHead(remap[:2], weights, bias, 3)
    with pytest.raises(ValueError, match="bias has"):
        LinearHead(remap, weights, bias[:1], 3)


# -- the native kernel is the reference, to float32 rounding ------------------------------------


@pytest.mark.usefixtures("native_available")
@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 64),
    classes=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_native_matches_reference(rows: int, classes: int, seed: int, data):
    from router._native.linear_head import linear_head_probs as native_probs

    rng = np.random.default_rng(seed)
    pad = data.draw(st.integers(1, 4096))
    remap = rng.integers(0, rows, size=pad + 1).astype(np.int64)
    weights = rng.normal(scale=3.0, size=(rows, classes)).astype(np.float32)
    bias = rng.normal(size=classes).astype(np.float32)
    ids = data.draw(padded_ids(pad, max_side=200))
    np.testing.assert_allclose(
        native_probs(ids, remap, weights, bias, pad),
        reference_probs(ids, remap, weights, bias, pad),
        rtol=1e-3,
        atol=1e-5,
    )


@pytest.mark.usefixtures("native_available")
@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 64),
    classes=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_int8_rows_sum_exactly_as_the_rows_multiplied_out(rows: int, classes: int, seed: int, data):
    """The kernel over int8 rows and their scales gives, bit for bit, what it gives over the
    same rows multiplied out in float32 (no fused multiply-add), and the reference agrees."""
    from router._native.linear_head import linear_head_probs as native_probs

    rng = np.random.default_rng(seed)
    pad = data.draw(st.integers(1, 4096))
    remap = rng.integers(0, rows, size=pad + 1).astype(np.int64)
    q = rng.integers(-127, 128, size=(rows, classes)).astype(np.int8)
    scales = (rng.random(rows) * data.draw(st.sampled_from([1e-3, 0.01, 0.05, 0.2]))).astype(
        np.float32
    )
    bias = rng.normal(size=classes).astype(np.float32)
    ids = data.draw(padded_ids(pad, max_side=200))
    scaled = native_probs(ids, remap, q, bias, pad, scales)
    multiplied = q.astype(np.float32) * scales[:, None]
    np.testing.assert_array_equal(scaled, native_probs(ids, remap, multiplied, bias, pad))
    np.testing.assert_allclose(
        scaled, reference_probs(ids, remap, q, bias, pad, scales), rtol=1e-3, atol=1e-5
    )


# -- int8 rows, bucket ids, the head cache ------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    weights=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=30),
        elements=st.floats(-1e3, 1e3, width=32),
    )
)
@example(weights=np.array([[3.6e-43]], dtype=np.float32))  # a subnormal scale
def test_int8_rows_are_within_half_a_step(weights: np.ndarray):
    q, scales = quantize_rows(weights)
    assert q.dtype == np.int8 and scales.dtype == np.float32 and (scales > 0).all()
    assert np.abs(q.astype(np.int16)).max() <= 127
    error = np.abs(q.astype(np.float32) * scales[:, None] - weights)
    # A scale below float32's normal range keeps only a few bits (a row whose largest weight
    # is under ~1.5e-36): each of up to 127 steps may then be off by half the smallest
    # subnormal, an absolute error of at most ~1e-43 that no logit can notice.
    subnormal = 128 * np.finfo(np.float32).smallest_subnormal
    assert (error <= scales[:, None] * 0.5 + 1e-6 * np.abs(weights) + subnormal).all()


@pytest.mark.parametrize("int8", [False, True])
def test_rows_given_by_bucket_id_equal_the_full_matrix(int8: bool):
    rng = np.random.default_rng(3)
    params = FeaturizerParams(buckets_log2=10)
    card = Classifier(make_model(10, 5, 0, 0.5), "x").card
    full = np.zeros((params.buckets, 5), dtype=np.float32)
    ids = np.sort(rng.choice(params.buckets, size=40, replace=False))
    full[ids] = rng.normal(size=(40, 5))
    bias = rng.normal(size=5).astype(np.float32)
    by_rows = build_linear_onnx(full[ids], bias, card, bucket_ids=ids, int8=int8)
    whole = build_linear_onnx(full, bias, card, int8=int8)
    probe = rng.integers(0, params.buckets + 1, size=(6, 20))
    np.testing.assert_array_equal(
        Classifier(by_rows, "r").predict(probe)[0], Classifier(whole, "w").predict(probe)[0]
    )
    with pytest.raises(ValueError, match="bucket ids"):
        build_linear_onnx(full[:3], bias, card, bucket_ids=np.array([0, 1, params.buckets]))


def test_an_int8_head_is_cached_as_int8_and_served_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("PLEXUS_CACHE_DIR", str(tmp_path))
    model_bytes = make_model(12, 7, 5, 0.3, int8=True)
    first = Classifier(model_bytes, "a")
    (entry,) = tmp_path.glob("head-*.npz")
    with np.load(entry) as arrays:
        assert arrays["weights"].dtype == np.int8 and "scales" in arrays.files
    again = Classifier(model_bytes, "b")  # from the cache this time
    ids = np.random.default_rng(0).integers(0, 2**12 + 1, size=(4, 50))
    np.testing.assert_array_equal(first.predict(ids)[0], again.predict(ids)[0])
    assert again.native_head is not None and again.native_head.scales is not None

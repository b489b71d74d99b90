"""Micro-benchmarks of the routing hot path (pytest-benchmark).

Run explicitly; pyproject's addopts disable benchmarks and its testpaths exclude bench/::

    python -m pytest bench/test_micro.py --benchmark-enable -p no:cacheprovider
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bench.api import (
    USING_NATIVE,
    Classifier,
    Featurizer,
    FeaturizerParams,
    load_config,
    tenant_examples,
    train_model,
)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "retail" / "plexus.yaml"
QUERY = (
    "hi, is the 65 inch samsung qled tv still in stock at store 1432 or should I just order online"
)
assert len(QUERY.split()) == 20


@pytest.fixture(scope="module")
def fast_model_bytes() -> bytes:
    """A fast-family model trained on the retail demo routes (and its out-of-scope data)."""
    loaded = load_config(DEMO_CONFIG)
    model = loaded.tenant("retail").model
    trained = train_model(
        tenant_examples(loaded, "retail"),
        family="fast",
        featurizer_params=FeaturizerParams(buckets_log2=model.buckets_log2, seed=model.seed),
        seed=model.seed,
    )
    return trained.model_bytes


@pytest.fixture(scope="module")
def fast_classifier(fast_model_bytes: bytes) -> Classifier:
    """The fast model as served: the native linear head."""
    return Classifier(fast_model_bytes, "micro")


@pytest.fixture(scope="module")
def fast_classifier_onnxruntime(fast_model_bytes: bytes) -> Classifier:
    """The same file run by onnxruntime (the baseline for the native head)."""
    return Classifier(fast_model_bytes, "micro", native_head=False)


@pytest.mark.skipif(not USING_NATIVE, reason="the native featurizer is not built")
def test_featurize_native(benchmark) -> None:  # type: ignore[no-untyped-def]
    featurizer = Featurizer(native=True)
    ids = benchmark(featurizer.featurize, QUERY)
    assert len(ids) > 0


def test_featurize_reference(benchmark) -> None:  # type: ignore[no-untyped-def]
    featurizer = Featurizer(native=False)
    ids = benchmark(featurizer.featurize, QUERY)
    assert len(ids) > 0
    if USING_NATIVE:
        np.testing.assert_array_equal(ids, Featurizer(native=True).featurize(QUERY))


def test_fast_classify(benchmark, fast_classifier: Classifier) -> None:  # type: ignore[no-untyped-def]
    """A whole fast-family decision: featurize + ONNX classify, one query."""

    def decide() -> np.ndarray:
        ids = fast_classifier.featurizer.featurize_batch([QUERY])
        return fast_classifier.predict(ids)[0]

    probs = benchmark(decide)
    assert probs.shape == (1, len(fast_classifier.labels))
    top = fast_classifier.labels[int(probs.argmax())]
    assert top == "inventory_check"


def test_fast_classify_only(benchmark, fast_classifier: Classifier) -> None:  # type: ignore[no-untyped-def]
    """The classifier part of a fast decision alone (native head), on precomputed ids."""
    ids = fast_classifier.featurizer.featurize_batch([QUERY])
    probs, _ = benchmark(fast_classifier.predict, ids)
    assert probs.shape == (1, len(fast_classifier.labels))


def test_fast_classify_only_onnxruntime(benchmark, fast_classifier_onnxruntime: Classifier) -> None:  # type: ignore[no-untyped-def]
    """The same model file and ids through onnxruntime."""
    ids = fast_classifier_onnxruntime.featurizer.featurize_batch([QUERY])
    probs, _ = benchmark(fast_classifier_onnxruntime.predict, ids)
    assert probs.shape == (1, len(fast_classifier_onnxruntime.labels))


@pytest.fixture(scope="module")
def identity_session() -> ort.InferenceSession:
    """A trivial Identity model with the same single-thread options as routing models."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["out"])],
        "identity",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "length"])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", "length"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def test_ort_identity_floor(benchmark, identity_session: ort.InferenceSession) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime's own per-call floor: one run of an Identity graph on a [1, 150] int64."""
    ids = np.arange(150, dtype=np.int64).reshape(1, -1)
    out = benchmark(identity_session.run, ["out"], {"ids": ids})
    np.testing.assert_array_equal(out[0], ids)

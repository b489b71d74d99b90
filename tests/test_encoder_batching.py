"""A text's embedding does not depend on the texts it is encoded with.

The served encoder quantizes activations to int8 at run time; these tests hold every text's
embedding, encoded in any batch (any companions, order, padding and batch size), to the one it
gets alone, within a cosine of 0.9999.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.routing.encoder import SentenceEncoder, per_row_activations

TEXTS = [
    "where is my order",
    "is the blue hoodie in size M available at the Elm Street location",
    "what time does the store close",
    "Hi, I placed an order on March 3rd for a crib mattress and haven't received a shipping "
    "confirmation yet. Can you check?",
    "refund",
    "how do I return shoes bought online to a store",
    "tell me a joke",
    "my card was charged twice for the same order and I want it fixed today",
    "ok",
    "Could you let me know if the Weber Spirit II grill is available to buy in person this "
    "weekend at store 1212, or whether I should order it online for delivery instead?",
    "¿dónde está mi pedido?",
    "SKU 448-2210 availability near zip 60614",
]
TOLERANCE = 0.9999


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


@pytest.fixture(scope="module")
def alone(encoder: SentenceEncoder) -> np.ndarray:
    return np.vstack([encoder.encode([text]) for text in TEXTS])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    picks=st.lists(st.integers(0, len(TEXTS) - 1), min_size=1, max_size=24),
    batch_size=st.integers(1, 16),
)
def test_an_embedding_is_the_same_in_any_batch(
    encoder: SentenceEncoder, alone: np.ndarray, picks: list[int], batch_size: int
) -> None:
    encoder.batch_size = batch_size
    try:
        batched = encoder.encode([TEXTS[i] for i in picks])
    finally:
        encoder.batch_size = 64
    assert batched.shape == (len(picks), encoder.dim)
    assert cosines(batched, alone[picks]).min() >= TOLERANCE


def test_a_long_text_beside_short_ones_changes_nothing(
    encoder: SentenceEncoder, alone: np.ndarray
) -> None:
    """The case that broke per-batch quantization: one long text pads and rescales the rest."""
    long_text = " ".join(TEXTS) * 3
    batched = encoder.encode([*TEXTS, long_text])
    assert cosines(batched[: len(TEXTS)], alone).min() >= TOLERANCE
    assert cosines(batched[-1:], encoder.encode([long_text])).min() >= TOLERANCE


def test_the_served_graph_stays_close_to_float32(encoder: SentenceEncoder) -> None:
    exact = SentenceEncoder(quantize=False).encode(TEXTS)
    assert cosines(encoder.encode(TEXTS), exact).min() >= 0.97
    assert np.median(cosines(encoder.encode(TEXTS), exact)) >= 0.99


def test_a_graph_wired_otherwise_is_refused() -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zp"]),
            helper.make_node("Identity", ["scale"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ValueError, match="used other than expected"):
        per_row_activations(model)
    assert isinstance(model, onnx.ModelProto)

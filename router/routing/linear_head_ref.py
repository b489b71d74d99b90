"""Numpy reference of the native linear head (``native/linear_head.pyx``)."""

from __future__ import annotations

import numpy as np


def linear_head_probs(
    ids: np.ndarray, remap: np.ndarray, weights: np.ndarray, bias: np.ndarray, pad_id: int
) -> np.ndarray:
    if ids.size and (ids.min() < 0 or ids.max() > pad_id):
        bad = ids[(ids < 0) | (ids > pad_id)][0]
        raise ValueError(f"feature id {bad} is outside [0, {pad_id}]")
    summed = weights[remap[ids]].sum(axis=1, dtype=np.float32).astype(np.float64)
    count = np.maximum((ids < pad_id).sum(axis=1, keepdims=True), 1)
    logits = summed / np.sqrt(count) + bias
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

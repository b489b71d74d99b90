"""Numpy reference of the native linear head (``native/linear_head.pyx``)."""

from __future__ import annotations

import numpy as np


def _check_ids(ids: np.ndarray, pad_id: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() > pad_id):
        bad = ids[(ids < 0) | (ids > pad_id)][0]
        raise ValueError(f"feature id {bad} is outside [0, {pad_id}]")


def _softmax_of_sums(
    summed: np.ndarray, ids: np.ndarray, bias: np.ndarray, pad_id: int
) -> np.ndarray:
    count = np.maximum((ids < pad_id).sum(axis=1, keepdims=True), 1)
    logits = summed.astype(np.float64) / np.sqrt(count) + bias
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def linear_head_probs(
    ids: np.ndarray,
    remap: np.ndarray,
    weights: np.ndarray,
    bias: np.ndarray,
    pad_id: int,
    scales: np.ndarray | None = None,
) -> np.ndarray:
    """``softmax(sum_j W[remap[ids[:, j]]] / sqrt(max(1, real ids)) + bias)``: float32 rows, or
    int8 rows times their ``scales`` (multiplied out in float32)."""
    _check_ids(ids, pad_id)
    if scales is not None:
        weights = weights.astype(np.float32) * np.reshape(scales, (-1, 1))
    summed = weights[remap[ids]].sum(axis=1, dtype=np.float32)
    return _softmax_of_sums(summed, ids, bias, pad_id)


class LinearHead:
    """The numpy twin of the native ``LinearHead``: :func:`linear_head_probs` over arrays
    given once (int8 ``weights`` with ``scales`` are multiplied out here, in float32)."""

    def __init__(
        self,
        remap: np.ndarray,
        weights: np.ndarray,
        bias: np.ndarray,
        pad_id: int,
        scales: np.ndarray | None = None,
    ):
        if scales is not None:
            if len(scales) != len(weights):
                raise ValueError(f"{len(scales)} scales for {len(weights)} weight rows")
            weights = weights.astype(np.float32) * np.reshape(scales, (-1, 1))  # once, here
        if len(weights) == 0:
            raise ValueError("the head has no weight rows")
        if len(bias) != weights.shape[1]:
            raise ValueError(f"bias has {len(bias)} entries for {weights.shape[1]} classes")
        if len(remap) != pad_id + 1:
            raise ValueError(f"remap has {len(remap)} entries; expected pad_id + 1 = {pad_id + 1}")
        self.remap, self.weights, self.bias, self.pad_id = remap, weights, bias, int(pad_id)

    def probs(self, ids: np.ndarray) -> np.ndarray:
        return linear_head_probs(ids, self.remap, self.weights, self.bias, self.pad_id)

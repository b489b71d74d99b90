import numpy as np

def linear_head_probs(
    ids: np.ndarray,
    remap: np.ndarray,
    weights: np.ndarray,
    bias: np.ndarray,
    pad_id: int,
    scales: np.ndarray | None = None,
) -> np.ndarray: ...

class LinearHead:
    pad_id: int
    def __init__(
        self,
        remap: np.ndarray,
        weights: np.ndarray,
        bias: np.ndarray,
        pad_id: int,
        scales: np.ndarray | None = None,
    ) -> None: ...
    def probs(self, ids: np.ndarray) -> np.ndarray: ...

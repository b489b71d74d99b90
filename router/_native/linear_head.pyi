import numpy as np

def linear_head_probs(
    ids: np.ndarray, remap: np.ndarray, weights: np.ndarray, bias: np.ndarray, pad_id: int
) -> np.ndarray: ...

"""Log-probabilities of target tokens from logits: the one place every backend's scoring ends."""

from __future__ import annotations

import numpy as np


def target_logprobs(logits: np.ndarray, targets: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``log softmax(logits)[i, targets[i]]`` for every row, computed in float64.

    The log-sum-exp is taken after subtracting each row's maximum (numerically stable); rows are
    processed ``chunk`` at a time so a ``[n, vocab]`` float64 copy never exists at once.

    Args:
        logits: ``[n, vocab]`` float (float32 from every backend).
        targets: ``[n]`` int token ids.

    Returns:
        float64 ``[n]`` natural-log probabilities (all <= 0).
    """
    targets = np.asarray(targets, dtype=np.int64)
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), chunk):
        block = np.asarray(logits[start : start + chunk], dtype=np.float64)
        peak = block.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(block - peak).sum(axis=-1)) + peak[:, 0]
        out[start : start + chunk] = block[np.arange(len(block)), targets[start : start + chunk]] - lse
    return out

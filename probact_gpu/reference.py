"""NumPy float64 references: forward values and analytic gradients, written from the maths (not
from torch), for the test suite and ``probact-gpu check``.

Conventions: inputs are float64 arrays; ``axis`` is the reduced axis; gradients take the
upstream gradient ``dy`` and return d(loss)/d(input). Edge values follow torch: a row that is
all −inf has a NaN softmax; NaN anywhere in a row makes the whole row NaN.
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------- softmax


def _row_max(x: np.ndarray, axis: int) -> np.ndarray:
    # np.max propagates NaN, as we want; an all −inf row has max −inf and then NaN below.
    return np.max(x, axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """(x − max) − log Σ exp(x − max)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        shifted = x - _row_max(x, axis)
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x − max) / Σ exp(x − max)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        e = np.exp(x - _row_max(x, axis))
        return e / np.sum(e, axis=axis, keepdims=True)


def softmax_grad(y: np.ndarray, dy: np.ndarray, axis: int = -1) -> np.ndarray:
    """dx = y ⊙ (dy − Σ dy ⊙ y), from the softmax output y."""
    return y * (dy - np.sum(dy * y, axis=axis, keepdims=True))


def log_softmax_grad(logp: np.ndarray, dy: np.ndarray, axis: int = -1) -> np.ndarray:
    """dx = dy − softmax(x) · Σ dy, from the log_softmax output."""
    return dy - np.exp(logp) * np.sum(dy, axis=axis, keepdims=True)

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


# ----------------------------------------------------------------------------- sigmoid, BCE


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(−x)), from e = exp(−|x|) so nothing overflows."""
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def logsigmoid(x: np.ndarray) -> np.ndarray:
    """min(x, 0) − log1p(exp(−|x|))."""
    with np.errstate(invalid="ignore"):
        return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def sigmoid_grad(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx = dy · σ(x) · (1 − σ(x))."""
    y = sigmoid(x)
    return dy * y * (1.0 - y)


def logsigmoid_grad(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx = dy · σ(−x)."""
    return dy * sigmoid(-x)


def _bce_reduce(v: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "none":
        return v
    total = np.sum(v)
    return np.asarray(total / v.size if reduction == "mean" else total, dtype=np.float64)


def bce_with_logits(x: np.ndarray, t: np.ndarray, weight: np.ndarray | None = None,
                    pos_weight: np.ndarray | None = None, reduction: str = "mean") -> np.ndarray:
    """w · ((1 − t)·x + (1 + (pw − 1)·t) · (log1p(exp(−|x|)) + max(−x, 0))) — torch's
    (1 − t)·x − lw·log σ(x), including its NaN where 0·inf appears; mean of nothing is NaN."""
    pw = 1.0 if pos_weight is None else pos_weight
    w = 1.0 if weight is None else weight
    with np.errstate(invalid="ignore"):
        lw = 1.0 + (pw - 1.0) * t
        loss = w * ((1.0 - t) * x - lw * logsigmoid(x))
        with np.errstate(divide="ignore"):
            return _bce_reduce(np.broadcast_to(loss, x.shape), reduction)


def bce_with_logits_grad(x: np.ndarray, t: np.ndarray, dy: np.ndarray,
                         weight: np.ndarray | None = None, pos_weight: np.ndarray | None = None,
                         reduction: str = "mean") -> np.ndarray:
    """dx = w · (σ(x)·(1 + (pw − 1)·t) − pw·t) · dy, divided by numel for mean (``dy`` is the
    per-element grad_output for ``none``, the scalar one otherwise)."""
    pw = 1.0 if pos_weight is None else pos_weight
    w = 1.0 if weight is None else weight
    with np.errstate(invalid="ignore"):
        grad = w * (sigmoid(x) * (1.0 + (pw - 1.0) * t) - pw * t) * dy
    if reduction == "mean":
        grad = grad / max(x.size, 1)
    return np.broadcast_to(grad, x.shape).copy()

"""NumPy float64 references: forward values and analytic gradients, written from the maths (not
from torch), for the test suite and ``probact-gpu check``.

Conventions: inputs are float64 arrays; ``axis`` is the reduced axis; gradients take the
upstream gradient ``dy`` and return d(loss)/d(input). Edge values follow torch: a row that is
all −inf has a NaN softmax; NaN anywhere in a row makes the whole row NaN.
"""

from __future__ import annotations

import math

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


def _exact_sum(v: np.ndarray) -> float:
    """Σ v correctly rounded (``math.fsum``; NaN / ±inf as ``np.sum`` gives them). ``np.sum``'s
    pairwise float64 sum is a few ulps off over a few hundred terms: as the reference of an fp64
    mean that was 3 ulps of error charged to an fp64 kernel whose sum was exact."""
    v = np.asarray(v, dtype=np.float64).ravel()
    if not np.all(np.isfinite(v)):
        return float(np.sum(v))
    return math.fsum(v)


def _bce_reduce(v: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "none":
        return v
    total = _exact_sum(v)
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


# ----------------------------------------------------------------------------- cross-entropy


def _ce_transform(x: np.ndarray, logit_scale: float, softcap: float | None):
    """z = softcap · tanh(x · scale / softcap) (or x · scale) and dz/dx."""
    y = x * logit_scale
    if softcap is None:
        return y, np.full_like(x, logit_scale)
    z = softcap * np.tanh(y / softcap)
    return z, logit_scale * (1.0 - np.tanh(y / softcap) ** 2)


def cross_entropy(
    x: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    dy: np.ndarray | float = 1.0,
):
    """Class-index cross-entropy of rows ``x`` (N, C) against ``target`` (N,), torch's semantics
    (label smoothing as torch: (1 − ε)·w_t·nll + (ε/C)·Σ_c w_c·(−log p_c); mean divides by
    Σ w_t over non-ignored rows) plus z_loss·lse² per non-ignored row (averaged over the
    non-ignored rows by mean, whatever the class weights), softcap and logit_scale.
    Returns (loss, lse, dL/dx for upstream ``dy``: a scalar, or one per row for "none"). A target
    out of [0, C) that is not ignored gives a NaN row."""
    n, c = x.shape
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    z, dzdx = _ce_transform(x, logit_scale, softcap)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        logp = log_softmax(z, axis=1)
        m = np.max(z, axis=1)
        lse = m + np.log(np.sum(np.exp(z - m[:, None]), axis=1))
        p = np.exp(logp)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < c)
    t = np.where(in_range, target, 0)
    w_t = np.where(valid & in_range, w[t], 0.0)
    rows = np.arange(n)
    with np.errstate(invalid="ignore"):
        nll = -logp[rows, t]
        smooth = -(logp * w[None, :]).sum(axis=1) if label_smoothing > 0 else 0.0
        z_rows = z_loss * lse**2
        loss_rows = (1 - label_smoothing) * w_t * nll + label_smoothing / c * smooth
    if reduction == "mean" and weight is not None:
        # The z term is averaged over the tokens: in rows divided by Σ w_t, scaled by Σ w_t / n.
        with np.errstate(invalid="ignore", divide="ignore"):
            z_scale = _exact_sum(w_t) / float(valid.sum())
    else:
        z_scale = 1.0
    with np.errstate(invalid="ignore"):
        loss_rows = loss_rows + z_scale * z_rows
    loss_rows = np.where(valid, loss_rows, 0.0)
    loss_rows = np.where(valid & ~in_range, np.nan, loss_rows)
    onehot = np.zeros_like(x)
    onehot[rows[in_range], t[in_range]] = 1.0
    with np.errstate(invalid="ignore"):
        # Each term as a difference of like quantities (p − onehot, p·W − w), so an exactly zero
        # gradient (one class: p = 1) comes out exactly zero rather than as float64 noise.
        dz = (1 - label_smoothing) * w_t[:, None] * (p - onehot) \
            + label_smoothing / c * (p * w.sum() - w[None, :]) \
            + 2 * z_loss * z_scale * lse[:, None] * p
    dz = np.where((valid & ~in_range)[:, None], np.nan, dz)
    dz = np.where(valid[:, None], dz, 0.0)
    if reduction == "none":
        g = np.broadcast_to(np.asarray(dy, np.float64), (n,))
        return loss_rows, lse, dz * dzdx * g[:, None]
    total = _exact_sum(loss_rows)
    g = float(dy)
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            divisor = _exact_sum(w_t) if weight is not None else float(valid.sum())
            total = total / divisor
            g = g / divisor
    return np.asarray(total), lse, dz * dzdx * g


def cross_entropy_soft(
    x: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    dy: np.ndarray | float = 1.0,
):
    """Class-probability cross-entropy of rows ``x`` (N, C): −Σ_c w_c t'_c log p_c with
    t' = (1 − ε)·t + ε/C, plus z_loss·lse²; mean divides by N (torch). Returns
    (loss, lse, dL/dx)."""
    n, c = x.shape
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    z, dzdx = _ce_transform(x, logit_scale, softcap)
    tt = target * (1 - label_smoothing) + label_smoothing / c
    logp = log_softmax(z, axis=1)
    lse = np.max(z, axis=1) + np.log(np.sum(np.exp(z - np.max(z, axis=1)[:, None]), axis=1))
    a = tt * w[None, :]
    loss_rows = -(a * logp).sum(axis=1) + z_loss * lse**2
    dz = np.exp(logp) * (a.sum(axis=1) + 2 * z_loss * lse)[:, None] - a
    if reduction == "none":
        g = np.broadcast_to(np.asarray(dy, np.float64), (n,))
        return loss_rows, lse, dz * dzdx * g[:, None]
    total, g = _exact_sum(loss_rows), float(dy)
    if reduction == "mean":
        total, g = total / n, g / n
    return np.asarray(total), lse, dz * dzdx * g

"""NumPy float64 references for the LM head's per-token outputs (token log-probs, entropy,
lse, argmax) and their gradient, written from the maths, for the tests and ``probact-gpu
check``.

The head transform, in ``probact_gpu.options``' order::

    z = x · logit_scale / logit_divisor;  z = softcap · tanh(z / softcap);  z = z / temperature

A row's statistics are taken around its max (0 for an all −inf row, as the kernels do, so such
a row has lse −inf and NaN log-probs and entropy).
"""

from __future__ import annotations

import numpy as np

__all__ = ["head_transform", "token_log_probs"]


def head_transform(x: np.ndarray, logit_scale: float = 1.0, logit_divisor: float = 1.0,
                   softcap: float | None = None, temperature: float = 1.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(z, dz/dx) of the logits ``x``."""
    pre = logit_scale / logit_divisor
    z = x * pre
    dzdx = np.full_like(x, pre)
    if softcap is not None:
        r = np.tanh(z / softcap)
        z = softcap * r
        dzdx = dzdx * (1.0 - r * r)
    return z / temperature, dzdx / temperature


def token_log_probs(
    x: np.ndarray,
    target: np.ndarray,
    *,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    logit_divisor: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    grad_logp: np.ndarray | None = None,
    grad_entropy: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """For logits ``x`` (…, V) and targets (…): ``logp = z_t − lse``, ``entropy = lse − Σ p·z``
    (0 for both on ``ignore_index`` rows; logp NaN for a target outside [0, V)), ``lse``,
    ``argmax`` (first max of z) and, when an upstream gradient is given, ``dx`` = the gradient
    of ``Σ grad_logp·logp + Σ grad_entropy·entropy`` w.r.t. ``x``::

        dz = g_logp · (onehot − p) − g_H · p · (z − Σ p·z)       (0 where z = −inf)
    """
    x = np.asarray(x, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    n_classes = x.shape[-1]
    z, dzdx = head_transform(x, logit_scale, logit_divisor, softcap, temperature)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(z, axis=-1, keepdims=True)
        shift = np.where(m == -np.inf, 0.0, m)
        rel = z - shift
        e = np.exp(rel)
        s = np.sum(e, axis=-1, keepdims=True)
        log_s = np.log(s)
        p = e / s
        rel0 = np.where(z == -np.inf, 0.0, rel)
        mu = np.sum(p * rel0, axis=-1, keepdims=True)
        entropy = (log_s - mu)[..., 0]
        lse = (shift + log_s)[..., 0]
        valid = target != ignore_index
        in_range = (target >= 0) & (target < n_classes)
        safe = np.where(in_range, target, 0)
        z_t = np.take_along_axis(z, safe[..., None], axis=-1)[..., 0]
        logp = np.where(valid, np.where(in_range, z_t - lse, np.nan), 0.0)
        entropy = np.where(valid, entropy, 0.0)
        out = {"logp": logp, "entropy": entropy, "lse": lse, "argmax": np.argmax(z, axis=-1)}
        if grad_logp is None and grad_entropy is None:
            return out
        dz = np.zeros_like(z)
        if grad_logp is not None:
            onehot = (np.arange(n_classes) == safe[..., None]).astype(np.float64)
            g = np.where(in_range, np.asarray(grad_logp, np.float64), np.nan)[..., None]
            dz += g * (onehot - p)
        if grad_entropy is not None:
            g = np.asarray(grad_entropy, np.float64)[..., None]
            dz -= g * np.where(z == -np.inf, 0.0, p * (rel0 - mu))
        out["dx"] = np.where(valid[..., None], dz * dzdx, 0.0)
    return out

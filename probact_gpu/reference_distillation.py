"""NumPy float64 references for distillation (``probact_gpu.distillation_loss``), written from
the definitions, for the tests and ``probact-gpu check``.

P is the teacher's distribution, Q the student's, both ``softmax(head(x) / temperature)``
(``reference_lm_head.head_transform``) over the first ``shared_vocab`` classes (all when None).
Per row::

    kl          Σ p (log p − log q)                          = KL(P ‖ Q)
    reverse_kl  Σ q (log q − log p)                          = KL(Q ‖ P)
    jsd         β KL(P ‖ M) + (1 − β) KL(Q ‖ M),  M = β P + (1 − β) Q;
                β = 0: KL(P ‖ Q), β = 1: KL(Q ‖ P)
    jsd_continuous   jsd / (β (1 − β)) for 0 < β < 1; KL(P‖Q), KL(Q‖P) at β = 0, 1
    tvd         ½ Σ |p − q|

A term whose weight (p or q) is 0 is 0. The mixture's log is ``np.logaddexp`` of the two
weighted log-probs (a different route from the kernels' on purpose). The row loss is
``coef · D + hard_weight · CE(softmax(head(x)), target)`` (coef = T² with
``temperature_squared``), 0 on rows whose target is ``ignore_index``.
"""

from __future__ import annotations

import numpy as np

from .reference import log_softmax
from .reference_lm_head import head_transform

__all__ = ["bucket_divergence", "distillation", "topk_distillation"]


def _divergence(lp, lq, divergence, beta):
    """(D per row, G = ∂D/∂Q per class) of distributions given by their logs along the last
    axis (``divergence`` one of kl, reverse_kl, jsd (0 < β < 1), tvd)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        p, q = np.exp(lp), np.exp(lq)
        if divergence == "kl":
            d = np.where(p > 0, p * (lp - lq), 0.0).sum(-1)
            g = np.where(p > 0, -p / q, 0.0)
        elif divergence == "reverse_kl":
            d = np.where(q > 0, q * (lq - lp), 0.0).sum(-1)
            g = lq - lp + 1.0
        elif divergence == "jsd":
            lm = np.logaddexp(np.log(beta) + lp, np.log1p(-beta) + lq)
            kl_pm = np.where(p > 0, p * (lp - lm), 0.0).sum(-1)
            kl_qm = np.where(q > 0, q * (lq - lm), 0.0).sum(-1)
            d = beta * kl_pm + (1.0 - beta) * kl_qm
            g = (1.0 - beta) * (lq - lm)
        elif divergence == "tvd":
            d = 0.5 * np.abs(p - q).sum(-1)
            g = 0.5 * np.sign(q - p)
        else:
            raise ValueError(divergence)
    return d, g


def _kind(divergence: str, beta: float, temperature: float,
          temperature_squared: bool) -> tuple[str, float]:
    coef = temperature ** 2 if temperature_squared else 1.0
    if divergence in ("jsd", "jsd_continuous"):
        if beta == 0.0:
            return "kl", coef
        if beta == 1.0:
            return "reverse_kl", coef
        if divergence == "jsd_continuous":
            coef /= beta * (1.0 - beta)
        return "jsd", coef
    return divergence, coef


def bucket_divergence(lp, lq, divergence, beta=0.5):
    """D per row of two distributions given by their logs (the last axis), by the definitions
    above (``divergence``: kl, reverse_kl, jsd with 0 < β < 1, tvd)."""
    return _divergence(np.asarray(lp, np.float64), np.asarray(lq, np.float64), divergence,
                       beta)[0]


def _soft_grad(q, g):
    """dD/dz = q (G − Σ q G) (0 where q = 0), the softmax chain rule of ∂D/∂q."""
    with np.errstate(invalid="ignore"):
        qg = np.where(q > 0, q * g, 0.0)
        return qg - q * qg.sum(-1, keepdims=True)


def distillation(
    x_s: np.ndarray,
    x_t: np.ndarray,
    target: np.ndarray | None = None,
    *,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    temperature_squared: bool = False,
    shared_vocab: int | None = None,
    student: dict | None = None,
    teacher: dict | None = None,
    grad_rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-row loss ``loss`` of student logits ``x_s`` (…, V_s) and teacher logits ``x_t``
    (…, V_t), and with ``grad_rows`` (one upstream gradient a row) ``dx`` = d(Σ g·loss)/dx_s.
    ``student`` / ``teacher``: the head transforms' keywords (logit_scale, logit_divisor,
    softcap)."""
    x_s = np.asarray(x_s, np.float64)
    x_t = np.asarray(x_t, np.float64)
    n = shared_vocab or x_s.shape[-1]
    kind, coef = _kind(divergence, beta, temperature, temperature_squared)
    z, dzdx = head_transform(x_s[..., :n], temperature=temperature, **(student or {}))
    w, _ = head_transform(x_t[..., :n], temperature=temperature, **(teacher or {}))
    lq, lp = log_softmax(z), log_softmax(w)
    d, g_q = _divergence(lp, lq, kind, beta)
    loss = coef * d
    if kind == "kl":  # q (G − Σ q G) with G = −p / q, kept exact where q underflows
        dz = coef * (np.exp(lq) - np.exp(lp))
    else:
        dz = coef * _soft_grad(np.exp(lq), g_q)
    kept = np.ones(x_s.shape[:-1], bool) if target is None else np.asarray(target) != ignore_index
    if hard_weight:
        zh, dzhdx = head_transform(x_s[..., :n], **(student or {}))
        t = np.asarray(target, np.int64)
        in_range = (t >= 0) & (t < n)
        lh = log_softmax(zh)
        safe = np.where(in_range, t, 0)
        ce = -np.take_along_axis(lh, safe[..., None], -1)[..., 0]
        loss = loss + hard_weight * np.where(in_range, ce, np.nan)
        onehot = np.arange(n) == safe[..., None]
        dzh = hard_weight * (np.exp(lh) - onehot)
        dzh = np.where(in_range[..., None], dzh, np.nan)
    out = {"loss": np.where(kept, loss, 0.0)}
    if grad_rows is None:
        return out
    g = np.asarray(grad_rows, np.float64)[..., None]
    with np.errstate(invalid="ignore"):
        dx = g * dz * dzdx
        if hard_weight:
            dx = dx + g * dzh * dzhdx
    full = np.zeros(x_s.shape)
    full[..., :n] = np.where(kept[..., None], dx, 0.0)
    out["dx"] = full
    return out


def topk_distillation(
    x_s: np.ndarray,
    indices: np.ndarray,
    log_probs: np.ndarray,
    target: np.ndarray | None = None,
    *,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    student: dict | None = None,
    grad_rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The sparse top-k teacher (temperature 1): buckets = the k classes of ``indices`` (…, k)
    and the tail. ``P_i = exp(log_probs_i)`` and ``P_tail = 1 − Σ P_i`` (when Σ P_i > 1: P_i / Σ,
    tail 0); ``Q_i = q[indices_i]``, ``Q_tail = Σ_{j ∉ indices} q_j`` (summed, not
    ``1 − Σ Q_i``). Returns ``loss`` and, with ``grad_rows``, ``dx``."""
    x_s = np.asarray(x_s, np.float64)
    idx = np.asarray(indices, np.int64)
    ell = np.asarray(log_probs, np.float64)
    v = x_s.shape[-1]
    kind, coef = _kind(divergence, beta, 1.0, False)
    z, dzdx = head_transform(x_s, **(student or {}))
    lq = log_softmax(z)
    q = np.exp(lq)
    member = np.zeros(x_s.shape, bool)
    np.put_along_axis(member, idx, True, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q_i = np.take_along_axis(q, idx, -1)
        q_tail = np.where(member, 0.0, q).sum(-1)
        p_i = np.exp(ell)
        total = p_i.sum(-1)
        over = total > 1.0
        p_i = np.where(over[..., None], p_i / total[..., None], p_i)
        p_tail = np.where(over, 0.0, 1.0 - total)
        lp_b = np.concatenate([np.log(p_i), np.log(p_tail)[..., None]], -1)
        lq_b = np.concatenate([np.take_along_axis(lq, idx, -1), np.log(q_tail)[..., None]], -1)
        d, g_b = _divergence(lp_b, lq_b, kind, beta)
        q_b = np.concatenate([q_i, q_tail[..., None]], -1)
        c = np.where(q_b > 0, q_b * g_b, 0.0).sum(-1, keepdims=True)
        g_class = np.broadcast_to(g_b[..., -1:], x_s.shape).copy()
        np.put_along_axis(g_class, idx, g_b[..., :-1], -1)
        dz = coef * np.where(q > 0, q * (g_class - c), 0.0)
        if kind == "kl":  # q_j − P_b · q_j / Q_b: q_i − P_i on the k, exact where q underflows
            p_class = np.broadcast_to(p_tail[..., None], x_s.shape).copy()
            np.put_along_axis(p_class, idx, p_i, -1)
            ratio = np.where(member, 1.0, q / q_tail[..., None])
            dz = coef * (q - np.where(p_class > 0, p_class * ratio, 0.0))
    loss = coef * d
    kept = np.ones(x_s.shape[:-1], bool) if target is None else np.asarray(target) != ignore_index
    if hard_weight:
        t = np.asarray(target, np.int64)
        in_range = (t >= 0) & (t < v)
        safe = np.where(in_range, t, 0)
        ce = -np.take_along_axis(lq, safe[..., None], -1)[..., 0]
        loss = loss + hard_weight * np.where(in_range, ce, np.nan)
        dzh = hard_weight * (q - (np.arange(v) == safe[..., None]))
        dz = dz + np.where(in_range[..., None], dzh, np.nan)
    out = {"loss": np.where(kept, loss, 0.0)}
    if grad_rows is not None:
        g = np.asarray(grad_rows, np.float64)[..., None]
        out["dx"] = np.where(kept[..., None], g * dz * dzdx, 0.0)
    return out

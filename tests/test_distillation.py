"""distillation_loss: every divergence, teacher form, path and option against the NumPy float64
reference (probact_gpu.reference_distillation), the semantics the docs promise (no hidden
terms, the mask, the reductions, the endpoints of TRL's JSD, vocabularies of different sizes,
a teacher that gets no gradient), and the edge rows (one-hot teachers, −inf logits, identical
distributions give exactly 0).

The per-row losses are fp32 (fp64 for fp64 logits) inside and returned in the student's dtype;
the launchers' rows are held to the fp32 tolerance on 16-bit input (both sides see the same
rounded logits), the gradient to the logits' dtype's.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import probact_gpu as pg
from probact_gpu import reference_distillation as ref
from probact_gpu.ops.distillation import (
    TopKTeacher,
    distillation_bwd,
    distillation_fwd,
    distillation_loss,
)
from probact_gpu.options import DistillationOptions
from probact_gpu.testing import (
    assert_close_to_reference,
    make_input,
    record_launches,
    to_numpy64,
)
from probact_gpu.tiling import RowConfig

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter's masked lanes

IGNORE = -100
# (name, keywords): every divergence; TRL's JSD inside (0, 1) and its continuous form
DIVERGENCES = [
    ("kl", dict(divergence="kl")),
    ("reverse_kl", dict(divergence="reverse_kl")),
    ("jsd", dict(divergence="jsd", beta=0.3)),
    ("jsd_continuous", dict(divergence="jsd_continuous", beta=0.7)),
    ("tvd", dict(divergence="tvd")),
]
HEADS = dict(student=dict(softcap=6.0, logit_scale=1.3), teacher=dict(logit_divisor=0.8))
HEAD_KW = dict(student_softcap=6.0, student_logit_scale=1.3, teacher_logit_divisor=0.8)


def _pair(rng, shape, dtype, device, scale=2.0):
    xs, xs64 = make_input(shape, dtype, rng, scale=scale, device=device)
    xt, xt64 = make_input(shape, dtype, rng, scale=scale, device=device)
    return xs, xs64, xt, xt64


def _target(rng, n, v, device, shape=None):
    t = rng.integers(0, v, n)
    t[1 % n] = IGNORE
    t = torch.from_numpy(t).to(device)
    return t if shape is None else t.reshape(shape)


def _check(xs, xs64, xt, xt64, t, dtype, kw, rng, device, *, ref_kw=None, rows_dtype=None):
    """The public function (reduction none) against the reference: loss rows and the gradient
    of Σ g·rows."""
    g = rng.standard_normal(t.shape if t is not None else xs.shape[:-1])
    expected = ref.distillation(xs64, xt64, None if t is None else to_numpy64(t).astype(int),
                                grad_rows=g, **(ref_kw or {}))
    s = xs.clone().requires_grad_()
    rows = distillation_loss(s, xt, t, reduction="none", **kw)
    assert rows.dtype == dtype and rows.shape == xs.shape[:-1]
    rows.backward(torch.from_numpy(g).to(device, dtype))
    assert_close_to_reference(rows, expected["loss"], rows_dtype or dtype, "loss rows")
    assert_close_to_reference(s.grad, expected["dx"], dtype, "dstudent")
    return rows, s.grad


def _ref_kw(kw):
    out = {k: v for k, v in kw.items() if k in ("divergence", "beta", "temperature",
                                                 "hard_weight", "temperature_squared",
                                                 "shared_vocab")}
    return out


# --------------------------------------------------------------------------- values, gradients


MATCH_CASES = [*[(name, kw, torch.float32) for name, kw in DIVERGENCES],
               ("kl", DIVERGENCES[0][1], torch.bfloat16),
               ("jsd", DIVERGENCES[2][1], torch.bfloat16),
               ("tvd", DIVERGENCES[4][1], torch.float16)]


@pytest.mark.parametrize("name,kw,dtype", MATCH_CASES,
                         ids=[f"{n}-{str(d).removeprefix('torch.')}" for n, _, d in MATCH_CASES])
def test_distillation_divergences_match_reference(name, kw, dtype, device, rng):
    """Each divergence with both heads' transforms, a temperature, a hard term on the 16-bit
    rows, and ignored tokens; (B, T, V) logits."""
    xs, xs64, xt, xt64 = _pair(rng, (2, 2, 67), dtype, device)
    t = _target(rng, 4, 67, device, (2, 2))
    kw = dict(kw, temperature=1.7, hard_weight=0.4 if dtype != torch.float32 else 0.0,
              **HEAD_KW)
    _check(xs, xs64, xt, xt64, t, dtype, kw, rng, device, ref_kw=dict(_ref_kw(kw), **HEADS))


@pytest.mark.parametrize("name,kw", [DIVERGENCES[0], DIVERGENCES[2]], ids=["kl", "jsd"])
def test_distillation_paths_fp64(name, kw, device, rng):
    """The launchers on the multi-tile path (the online sweep; JSD's reverse second sweep) and
    the split path (partials merged on the device, chunks past the row's end), against the
    reference in fp64; the path asserted from the launch record. (One tile: every other test.)"""
    xs, xs64, xt, xt64 = _pair(rng, (2, 100), torch.float64, device)
    t = _target(rng, 2, 100, device)
    opts = dict(kw, temperature=0.9, hard_weight=0.3)
    options = DistillationOptions.from_kwargs(**opts, **HEAD_KW)
    g = rng.standard_normal(2)
    expected = ref.distillation(xs64, xt64, to_numpy64(t).astype(int), grad_rows=g,
                                **_ref_kw(opts), **HEADS)
    for config, path in ((RowConfig("multi", 32, 4), "multi"),
                         (RowConfig("split", 16, 4, n_splits=8), "split")):
        with record_launches() as log:
            rows, stats = distillation_fwd(xs, xt, t, options=options, n_cols=100,
                                           save_stats=True, config=config)
            dx = distillation_bwd(xs, xt, t, stats, torch.from_numpy(g).to(device),
                                  options=options, n_cols=100, config=config)
        assert {launch.path for launch in log} == {path}
        assert_close_to_reference(rows, expected["loss"], torch.float64, f"rows {config}")
        assert_close_to_reference(dx, expected["dx"], torch.float64, f"dx {config}")


def test_distillation_gradcheck_fp64(device, rng):
    """The analytic gradient against finite differences: JSD (the mixture's chain rule) with
    the hard term, a softcap and a temperature; the other divergences' gradients are checked
    against torch's autograd of their definitions below."""
    xs = torch.from_numpy(rng.standard_normal((1, 5)) * 2).to(device).requires_grad_()
    xt = torch.from_numpy(rng.standard_normal((1, 5)) * 2).to(device)
    t = torch.tensor([4], device=device)

    def f(x):
        return distillation_loss(x, xt, t, reduction="none", divergence="jsd", beta=0.3,
                                 hard_weight=0.5, temperature=1.5, student_softcap=4.0)

    assert torch.autograd.gradcheck(f, (xs,), eps=1e-6, atol=1e-7)


def _definitions(xs, xt, divergence, beta=0.5, temperature=1.0):
    """Each divergence per row by its definition in torch ops (float64, autograd)."""
    lq = torch.log_softmax(xs / temperature, -1)
    lp = torch.log_softmax(xt / temperature, -1)
    p, q = lp.exp(), lq.exp()
    if divergence == "kl":
        return (p * (lp - lq)).sum(-1)
    if divergence == "reverse_kl":
        return (q * (lq - lp)).sum(-1)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    lm = torch.logsumexp(torch.stack([lq + math.log1p(-beta), lp + math.log(beta)]), 0)
    return beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)


def test_distillation_gradients_match_torch_autograd_of_definitions(device, rng):
    """Value and gradient of every divergence against torch's autograd through its definition
    (float64), an independent route to the kernels' analytic gradients."""
    xs, _, xt, _ = _pair(rng, (3, 19), torch.float64, device)
    g = torch.from_numpy(rng.standard_normal(3)).to(device)
    for name in ("kl", "reverse_kl", "jsd", "tvd"):
        a, b = xs.clone().requires_grad_(), xs.clone().requires_grad_()
        theirs = _definitions(a, xt, name, beta=0.35, temperature=1.3)
        ours = distillation_loss(b, xt, divergence=name, beta=0.35, temperature=1.3,
                                 reduction="none")
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
        (theirs * g).sum().backward()
        (ours * g).sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- semantics


def test_distillation_jsd_endpoints_are_trl_kl_and_continuous_limits(device, rng):
    """TRL's JSD: β = 0 is KL(P‖Q) and β = 1 is KL(Q‖P) (bitwise: the same kernel); inside,
    JSD → 0 at the ends (the discontinuity), while jsd_continuous → the two KLs."""
    xs, _, xt, _ = _pair(rng, (2, 40), torch.float64, device)

    def loss(**kw):
        return distillation_loss(xs, xt, reduction="none", **kw)

    kl, rkl = loss(divergence="kl"), loss(divergence="reverse_kl")
    assert torch.equal(loss(divergence="jsd", beta=0.0), kl)
    assert torch.equal(loss(divergence="jsd", beta=1.0), rkl)
    assert torch.equal(loss(divergence="jsd_continuous", beta=0.0), kl)
    assert float(loss(divergence="jsd", beta=1e-6).abs().max()) < 1e-4
    # the limits: a first-order term β·χ²/2 of relative size ~β·χ²/KL remains
    torch.testing.assert_close(loss(divergence="jsd_continuous", beta=1e-9), kl, rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(loss(divergence="jsd_continuous", beta=1 - 1e-9), rkl,
                               rtol=1e-6, atol=0)
    mid = loss(divergence="jsd", beta=0.25)
    torch.testing.assert_close(loss(divergence="jsd_continuous", beta=0.25),
                               mid / (0.25 * 0.75), rtol=1e-12, atol=0)


def test_distillation_temperature_both_heads_no_t2(device, rng):
    """The temperature divides both heads' logits (after their transforms) and nothing else:
    T² only when asked."""
    xs, _, xt, _ = _pair(rng, (5, 30), torch.float64, device)
    t2 = distillation_loss(xs, xt, temperature=2.0)
    assert torch.equal(t2, distillation_loss(xs, xt, student_logit_divisor=2.0,
                                             teacher_logit_divisor=2.0))
    torch.testing.assert_close(distillation_loss(xs, xt, temperature=2.0,
                                                 temperature_squared=True), 4.0 * t2,
                               rtol=1e-14, atol=0)


def test_distillation_no_hidden_hard_term_target_is_a_mask(device, rng):
    """A target changes nothing but the mask: any non-ignored value gives the same loss; the
    hard term only with hard_weight (the student's CE at its temperature-free transform)."""
    xs, xs64, xt, xt64 = _pair(rng, (6, 25), torch.float64, device)
    t = _target(rng, 6, 25, device)
    other = torch.where(t == IGNORE, t, (t + 7) % 25)
    base = distillation_loss(xs, xt, t, reduction="none", temperature=1.3)
    assert torch.equal(base, distillation_loss(xs, xt, other, reduction="none",
                                               temperature=1.3))
    assert float(base[1]) == 0.0
    with_hard = distillation_loss(xs, xt, t, reduction="none", temperature=1.3,
                                  hard_weight=0.25)
    ce = torch.nn.functional.cross_entropy(xs, t, reduction="none", ignore_index=IGNORE)
    torch.testing.assert_close(with_hard - base, 0.25 * ce, rtol=1e-12, atol=1e-12)


def test_distillation_reductions(device, rng):
    xs, _, xt, _ = _pair(rng, (2, 2, 20), torch.float32, device)
    t = _target(rng, 4, 20, device, (2, 2))
    rows = distillation_loss(xs, xt, t, reduction="none")
    kept = int((t != IGNORE).sum())
    torch.testing.assert_close(distillation_loss(xs, xt, t), rows.sum() / kept)
    torch.testing.assert_close(distillation_loss(xs, xt, t, reduction="sum"), rows.sum())
    torch.testing.assert_close(
        distillation_loss(xs, xt, t, reduction="sum", normalizer=torch.tensor(3.0,
                                                                               device=device)),
        rows.sum() / 3.0)
    # without a target: the mean over every token
    torch.testing.assert_close(distillation_loss(xs[:1], xt[:1]),
                               distillation_loss(xs[:1], xt[:1], reduction="none").mean())
    # every token ignored: 0 (as TRL's GKD), and a zero gradient
    s = xs.clone().requires_grad_()
    out = distillation_loss(s, xt, torch.full_like(t, IGNORE))
    out.backward()
    assert float(out.detach()) == 0.0 and not bool(s.grad.any())
    assert float(distillation_loss(xs[:0], xt[:0], t[:0])) == 0.0  # no tokens at all


def test_distillation_teacher_log_probs_equal_logits(device, rng):
    """An inference server's log-probs are the teacher's logits up to a per-row constant."""
    xs, _, xt, _ = _pair(rng, (2, 50), torch.float64, device)
    logp = torch.log_softmax(xt / 0.7, -1)
    for _, kw in DIVERGENCES:
        torch.testing.assert_close(distillation_loss(xs, logp, temperature=1.0, **kw),
                                   distillation_loss(xs, xt, teacher_logit_divisor=0.7, **kw),
                                   rtol=1e-12, atol=1e-13)


def test_distillation_teacher_gets_no_gradient(device, rng):
    xs, _, xt, _ = _pair(rng, (3, 10), torch.float32, device)
    teacher = xt.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"teacher_logits requires grad.*detach"):
        distillation_loss(xs.requires_grad_(), teacher)
    with torch.no_grad():
        distillation_loss(xs, teacher)
    distillation_loss(xs, teacher.detach()).backward()


def test_distillation_vocab_sizes(device, rng):
    """Different sizes raise unless shared_vocab is given; then both distributions are taken
    over the shared classes, renormalised, and the student's other classes get zero gradient."""
    xs, xs64 = make_input((4, 30), torch.float32, rng, device=device)
    xt, xt64 = make_input((4, 34), torch.float32, rng, device=device)
    with pytest.raises(ValueError, match=r"30 classes and teacher_logits 34.*shared_vocab=30"):
        distillation_loss(xs, xt)
    with pytest.raises(ValueError, match="shared_vocab=31 is more classes"):
        distillation_loss(xs, xt, shared_vocab=31)
    kw = dict(divergence="jsd", beta=0.4, shared_vocab=26)
    rows, grad = _check(xs, xs64, xt, xt64, None, torch.float32, kw, rng, device,
                        ref_kw=kw)
    assert not bool(grad[:, 26:].any())
    torch.testing.assert_close(rows, distillation_loss(xs[:, :26], xt[:, :26], reduction="none",
                                                       divergence="jsd", beta=0.4))


# --------------------------------------------------------------------------- edge rows


def _edge_rows(rng, v):
    """(student, teacher) float64 rows: a one-hot teacher; −inf entries on both sides (the
    student's only where the teacher's are, so every KL is finite); ±1e4; both near −1e4."""
    x = rng.standard_normal((8, v)) * 2
    xs, xt = x[:4].copy(), x[4:].copy()
    xt[0] = -np.inf
    xt[0, rng.integers(0, v)] = 1.0
    hole = rng.random(v) < 0.3
    xt[1, hole] = -np.inf
    xs[1, hole & (rng.random(v) < 0.5)] = -np.inf
    xs[2], xt[2] = np.sign(xs[2]) * 1e4 + xs[2], np.sign(xt[2]) * 1e4 + xt[2]
    xs[3], xt[3] = xs[3] - 1e4, xt[3] - 1e4
    return xs, xt


def test_distillation_edge_rows(device, rng):
    """One-hot and −inf teachers, −inf student entries, ±1e4 and −1e4 rows: every divergence's
    values and gradients against the reference, NaN nowhere the reference has none. A row whose
    divergence is +inf (reverse KL where the teacher has a 0 the student has not) is +inf here
    too; its gradient is not compared (there is none)."""
    xs64, xt64 = _edge_rows(rng, 45)
    xs = torch.from_numpy(xs64).float().to(device)
    xt = torch.from_numpy(xt64).float().to(device)
    xs64, xt64 = to_numpy64(xs), to_numpy64(xt)
    g = rng.standard_normal(4)
    for _, kw in DIVERGENCES:
        expected = ref.distillation(xs64, xt64, grad_rows=g, **_ref_kw(kw))
        s = xs.clone().requires_grad_()
        rows = distillation_loss(s, xt, reduction="none", **kw)
        rows.backward(torch.from_numpy(g).float().to(device))
        assert_close_to_reference(rows, expected["loss"], torch.float32, f"{kw} rows")
        finite = np.isfinite(expected["loss"])
        assert finite[[2, 3]].all()
        assert_close_to_reference(s.grad[finite], expected["dx"][finite], torch.float32,
                                  f"{kw} dstudent")


def test_distillation_student_zero_where_teacher_has_mass(device):
    """KL(P‖Q) is +inf where Q puts 0 on a class P does not (the maths; torch's kl_div too),
    and the other divergences stay finite."""
    xt = torch.zeros((1, 6), device=device)
    xs = torch.zeros((1, 6), device=device)
    xs[0, 2] = float("-inf")
    assert float(distillation_loss(xs, xt, divergence="kl")) == math.inf
    for name in ("jsd", "tvd"):
        assert math.isfinite(float(distillation_loss(xs, xt, divergence=name)))


def test_distillation_identical_distributions_exactly_zero(device, rng):
    """Identical rows (also with −inf entries and a one-hot row): every divergence is exactly 0,
    and so is the gradient; the same distribution from shifted logits is 0 to rounding."""
    x64 = rng.standard_normal((2, 37)) * 3
    x64[0, ::3] = -np.inf
    x64[1] = -np.inf
    x64[1, 5] = 2.0
    x = torch.from_numpy(x64).to(device, torch.bfloat16)
    for _, kw in DIVERGENCES:
        s = x.clone().requires_grad_()
        rows = distillation_loss(s, x, reduction="none", temperature=0.6, **kw)
        rows.sum().backward()
        assert not bool(rows.any()), kw
        assert not bool(s.grad.any()), kw
    shifted = distillation_loss(x.float(), x.float() + 5.0, reduction="none")
    assert float(shifted.abs().max()) < 1e-6


def test_distillation_underflowing_teacher_no_nan(device, rng):
    """Teacher probabilities that underflow to 0 in fp32 (p·log p at p → 0) and a student
    that puts −inf there: finite, no NaN from 0·(−inf)."""
    xt = torch.zeros((1, 20), device=device)
    xt[:, 0] = 200.0  # every other class has p = e^−200 = 0 in fp32
    xs = torch.randn((1, 20), device=device)
    xs[:, 5:] = float("-inf")
    for _, kw in DIVERGENCES:
        s = xs.clone().requires_grad_()
        rows = distillation_loss(s, xt, reduction="none", **kw)
        rows.sum().backward()
        assert bool(torch.isfinite(rows).all()) and bool(torch.isfinite(s.grad).all()), kw


# --------------------------------------------------------------------------- sparse teacher


def _topk(rng, n, v, k, device, scale=3.0):
    full = torch.from_numpy(rng.standard_normal((n, v)) * scale)
    logp = torch.log_softmax(full, -1)
    lp, idx = logp.topk(k, -1)
    perm = torch.from_numpy(np.stack([rng.permutation(k) for _ in range(n)]))
    return idx.gather(1, perm).to(device), lp.gather(1, perm).to(device)


@pytest.mark.parametrize("name,kw", DIVERGENCES, ids=[n for n, _ in DIVERGENCES])
def test_distillation_topk_matches_reference(name, kw, device, rng):
    """The sparse teacher over k classes + the tail, a hard term, ignored tokens; the backward
    split over chunks on the last divergence (the k scattered by split 0 only)."""
    xs, xs64 = make_input((3, 90), torch.float32, rng, scale=2.0, device=device)
    idx, lp = _topk(rng, 3, 90, 7, device)
    t = _target(rng, 3, 90, device)
    g = rng.standard_normal(3)
    expected = ref.topk_distillation(xs64, to_numpy64(idx).astype(int), to_numpy64(lp.float()),
                                     to_numpy64(t).astype(int), hard_weight=0.5, grad_rows=g,
                                     student=dict(softcap=5.0), **_ref_kw(kw))
    s = xs.clone().requires_grad_()
    rows = distillation_loss(s, TopKTeacher(idx, lp.float()), t, reduction="none",
                             hard_weight=0.5, student_softcap=5.0, **kw)
    rows.backward(torch.from_numpy(g).float().to(device))
    assert_close_to_reference(rows, expected["loss"], torch.float32, "loss rows")
    assert_close_to_reference(s.grad, expected["dx"], torch.float32, "dstudent")


def test_distillation_topk_split_backward_and_k_equals_v(device, rng):
    from probact_gpu.ops.distillation import distillation_topk_bwd, distillation_topk_fwd

    xs, xs64 = make_input((2, 70), torch.float64, rng, scale=2.0, device=device)
    for k in (5, 70):  # k = V: an empty tail
        idx, lp = _topk(rng, 2, 70, k, device)
        g = rng.standard_normal(2)
        expected = ref.topk_distillation(xs64, to_numpy64(idx).astype(int), to_numpy64(lp),
                                         divergence="jsd", beta=0.6, grad_rows=g)
        options = DistillationOptions(divergence="jsd", beta=0.6)
        cfg = RowConfig("split", 16, 4, n_splits=3)
        with record_launches() as log:
            rows, stats = distillation_topk_fwd(xs, idx, lp, None, options=options,
                                                save_stats=True)
            dx = distillation_topk_bwd(xs, idx, lp, None, stats, torch.from_numpy(g),
                                       options=options, config=cfg)
        assert [launch.path for launch in log] == ["multi", "split"]
        assert_close_to_reference(rows, expected["loss"], torch.float64, "rows")
        assert_close_to_reference(dx, expected["dx"], torch.float64, "dx")


def test_distillation_topk_tail_is_summed_not_cancelled(device):
    """A student with nearly all its mass on the teacher's k: its tail mass (~1e-9) is summed
    over the tail classes, where 1 − Σ Q_i in fp32 would be 0 or ~1e-7 (an error of 100 % and
    more in the KL's tail term)."""
    v, k = 64, 4
    xs = torch.full((1, v), -20.0, device=device)
    xs[0, :k] = 0.0  # tail mass 60·e^−20 / 4 ≈ 3.1e-8 of the whole
    idx = torch.arange(k, device=device)[None]
    lp = torch.full((1, k), math.log(0.2), device=device)  # teacher: 0.8 on the k, 0.2 tail
    got = distillation_loss(xs, TopKTeacher(idx, lp))
    expected = ref.topk_distillation(to_numpy64(xs), to_numpy64(idx).astype(int),
                                     to_numpy64(lp))["loss"]
    assert abs(float(got) - float(expected[0])) < 1e-5 * float(expected[0])


def test_distillation_topk_rules(device, rng):
    """Log-probs summing past 1 (rounding) are renormalised with an empty tail; a repeated or
    out-of-range index gives a NaN row (and NaN gradient), never an out-of-bounds access; the
    temperature, shared_vocab and teacher transforms are refused with a reason."""
    xs, xs64 = make_input((3, 30), torch.float32, rng, device=device)
    idx = torch.tensor([[0, 1, 2], [3, 4, 4], [5, 6, 30]], device=device)
    lp = torch.log(torch.tensor([[0.5, 0.4, 0.2], [0.2, 0.2, 0.2], [0.1, 0.1, 0.1]],
                                device=device))
    s = xs.clone().requires_grad_()
    rows = distillation_loss(s, TopKTeacher(idx, lp), reduction="none")
    rows.sum().backward()
    expected = ref.topk_distillation(xs64[:1], [[0, 1, 2]], np.log([[0.5, 0.4, 0.2]]))
    assert_close_to_reference(rows[:1], expected["loss"], torch.float32, "renormalised")
    assert bool(torch.isnan(rows[1:]).all()) and bool(torch.isnan(s.grad[1:]).all())
    assert bool(torch.isfinite(s.grad[0]).all())
    teacher = TopKTeacher(idx[:1], lp[:1])
    with pytest.raises(ValueError, match="student_logit_divisor=2.0"):
        distillation_loss(xs[:1], teacher, temperature=2.0)
    with pytest.raises(ValueError, match="shared_vocab does not apply"):
        distillation_loss(xs[:1], teacher, shared_vocab=20)
    with pytest.raises(ValueError, match="do not apply to a TopKTeacher"):
        distillation_loss(xs[:1], teacher, teacher_softcap=3.0)
    with pytest.raises(ValueError, match="1 to 1024 classes"):
        distillation_loss(xs[:1], TopKTeacher(idx[:1, :0], lp[:1, :0]))


# --------------------------------------------------------------------------- arguments


def test_distillation_bad_arguments_name_themselves(device):
    xs, xt = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    cases = [
        (dict(divergence="js"), ValueError, "divergence must be one of"),
        (dict(beta=1.5), ValueError, r"beta must be in \[0.0, 1.0\]"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(hard_weight=1.0), ValueError, "hard_weight=1.0 .* pass target"),
        (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
        (dict(normalizer=2.0), ValueError, "normalizer divides the summed loss"),
        (dict(teacher_softcap=0.0), ValueError, "teacher_softcap"),
        (dict(student_logit_divisor=0.0), ValueError, "student_logit_divisor"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            distillation_loss(xs, xt, **kw)
    with pytest.raises(TypeError, match="float64 on one side"):
        distillation_loss(xs.double(), xt)
    with pytest.raises(ValueError, match="same leading"):
        distillation_loss(xs, xt[:2])
    with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
        distillation_loss(xs, xt, torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="int32 or int64"):
        distillation_loss(xs, xt, torch.zeros(3, device=device))


def test_distillation_modules(device, rng):
    xs, _, xt, _ = _pair(rng, (4, 12), torch.float32, device)
    t = _target(rng, 4, 12, device)
    module = pg.DistillationLoss("reverse_kl", temperature=1.5, hard_weight=0.1)
    assert "hard_weight=0.1" in repr(module)
    torch.testing.assert_close(module(xs, xt, t), distillation_loss(
        xs, xt, t, divergence="reverse_kl", temperature=1.5, hard_weight=0.1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="divergence"):
        pg.DistillationLoss("l2")


# --------------------------------------------------------------------------- TRL


def _trl_generalized_jsd_loss():
    """TRL's own ``generalized_jsd_loss``, taken from its source without importing TRL (its
    trainer module needs datasets, accelerate, ...): the function's definition alone, executed
    with torch and F. None when TRL is not installed."""
    import ast

    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    for rel in ("experimental/gkd/gkd_trainer.py", "trainer/gkd_trainer.py"):
        path = root / rel
        if path.is_file():
            break
    else:
        return None
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "generalized_jsd_loss":
            node.decorator_list = []
            module = ast.Module(body=[node], type_ignores=[])
            scope = {"torch": torch, "F": torch.nn.functional}
            exec(compile(module, str(path), "exec"), scope)
            return scope["generalized_jsd_loss"]
    return None


def test_distillation_matches_trl_generalized_jsd_formula(device, rng):
    """TRL's GKD objective (``beta``, ``temperature``, labels masking, ``batchmean``) written
    from its formula in float64 torch: ``jsd`` with ``reduction='mean'`` is the same number."""
    xs, _, xt, _ = _pair(rng, (2, 3, 21), torch.float64, device)
    labels = _target(rng, 6, 21, device, (2, 3))
    for beta in (0.0, 0.5, 0.9):
        ls = torch.log_softmax(xs / 2.0, -1)
        lt = torch.log_softmax(xt / 2.0, -1)
        if beta == 0.0:
            elem = lt.exp() * (lt - ls)
        elif beta == 1.0:
            elem = ls.exp() * (ls - lt)
        else:
            lm = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), 0)
            elem = beta * lt.exp() * (lt - lm) + (1 - beta) * ls.exp() * (ls - lm)
        mask = labels != IGNORE
        trl = elem[mask].sum() / mask.sum()
        ours = distillation_loss(xs, xt, labels, divergence="jsd", beta=beta, temperature=2.0)
        torch.testing.assert_close(ours, trl, rtol=1e-12, atol=1e-13)


def test_distillation_matches_trl_generalized_jsd_loss(device, rng):
    """Against TRL's own function where TRL is installed (skips otherwise): value and gradient,
    batchmean with labels, at β = 0, 0.5, 1 and a temperature."""
    trl = _trl_generalized_jsd_loss()
    if trl is None:
        pytest.skip("TRL is not installed")
    xs, _, xt, _ = _pair(rng, (2, 4, 33), torch.float64, device)
    labels = _target(rng, 8, 33, device, (2, 4))
    for beta in (0.0, 0.5, 1.0):
        a, b = xs.clone().requires_grad_(), xs.clone().requires_grad_()
        theirs = trl(a, xt, labels=labels, beta=beta, temperature=1.7)
        ours = distillation_loss(b, xt, labels, divergence="jsd", beta=beta, temperature=1.7)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-13)
        theirs.backward()
        ours.backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-13)


def test_distillation_strided_views_and_a_single_token(device, rng):
    """A transposed student and a column-sliced teacher are read in place (the result equals
    the contiguous one's, gradient included); (V,) logits with a 0-d target are one token."""
    base_s, _ = make_input((30, 4), torch.float32, rng, device=device)
    base_t, _ = make_input((4, 40), torch.float32, rng, device=device)
    s, t = base_s.t(), base_t[:, 5:35]  # (4, 30) each: column stride 4, row stride 40
    a, b = s.clone().requires_grad_(), s.contiguous().requires_grad_()
    strided = distillation_loss(a, t, divergence="jsd")
    dense = distillation_loss(b, t.contiguous(), divergence="jsd")
    strided.backward()
    dense.backward()
    assert torch.equal(strided, dense) and torch.equal(a.grad, b.grad)
    one = distillation_loss(s[0], t[0], torch.tensor(3, device=device), reduction="none")
    assert one.shape == () and torch.equal(one, distillation_loss(s[:1], t[:1],
                                                                  reduction="none")[0])


def test_distillation_tiling_heuristics():
    """The launch choices of tiling.py: one program per row over 8 KiB tiles of each row; split
    rows when the rows alone leave SMs idle; the fused linear form's token chunk bounds both
    heads' logits by the budget (8192 × 4096 × 128256 bf16: 1024 tokens, 2 × 250.5 MiB)."""
    from probact_gpu import tiling

    cfg = tiling.choose_distillation_config(4096, 128256, 2, 132)
    assert (cfg.path, cfg.block_n, cfg.num_warps) == ("multi", 4096, 8)
    assert tiling.choose_distillation_config(4096, 128256, 4, 132).block_n == 2048
    assert tiling.choose_distillation_config(4096, 37, 2, 132).block_n == 64  # one tile
    # fp64: 1024-column tiles at 8 warps (the JSD backward with a hard term spilled at 4)
    assert tiling.choose_distillation_config(4096, 32000, 8, 132).num_warps == 8
    few = tiling.choose_distillation_config(8, 262144, 2, 132)
    assert (few.path, few.n_splits) == ("split", 64)  # chunks of SPLIT_MIN_CHUNK columns
    chunk = tiling.choose_distillation_token_chunk(8192, 128256 * (2 + 2))
    assert chunk == 1024 and 2 * chunk * 128256 * 2 <= tiling.LINEAR_CE_LOGITS_BUDGET
    assert tiling.choose_distillation_token_chunk(8192, 128256 * 4, 1 << 20) == 2

"""Autograd at the edges, for every op: inputs that can require grad (class weights, soft
targets, tensor options) get their gradient or a clear error, as torch does. Tiny shapes, float64
where gradients are checked (gradcheck and the float64 reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import probact_gpu
import probact_gpu.distributed
from probact_gpu.testing import make_input

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter's inf − inf lanes

IGNORE = -100


def _targets(rng, n, c, device, ignore=True):
    t = torch.from_numpy(rng.integers(0, c, n)).to(device)
    if ignore:
        t[0] = IGNORE
    return t


def _probs(rng, n, c, device, dtype=torch.float64):
    p = torch.from_numpy(rng.dirichlet([1.0] * c, n)).to(dtype).to(device)
    return p


# ----------------------------------------------------------------------------- class weights


def test_class_weight_requiring_grad_raises_with_class_indices_as_torch(device, rng):
    """torch refuses a class weight that requires grad with class-index targets (its nll_loss
    is not differentiable w.r.t. it), at the call, whether or not the input requires grad; it
    is accepted under no_grad. Silently giving it no gradient was the bug."""
    n, c, h = 4, 7, 5
    x, _ = make_input((n, c), torch.float32, rng, device=device)
    t = _targets(rng, n, c, device)
    w = torch.rand(c, device=device).add_(0.5).requires_grad_()
    hidden, _ = make_input((n, h), torch.float32, rng, device=device)
    head, _ = make_input((c, h), torch.float32, rng, device=device)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument"):
        torch.nn.functional.cross_entropy(x, t, w)
    calls = {
        "cross_entropy": lambda: probact_gpu.cross_entropy(x.requires_grad_(), t, w),
        "cross_entropy (input without grad)": lambda: probact_gpu.cross_entropy(
            x.detach(), t, w, reduction="sum"),
        "CrossEntropyLoss": lambda: probact_gpu.CrossEntropyLoss(weight=w)(x, t),
        "linear_cross_entropy": lambda: probact_gpu.linear_cross_entropy(
            hidden, head, t, weight=w),
        "vocab_parallel_cross_entropy": lambda: probact_gpu.distributed.
        vocab_parallel_cross_entropy(x, t, weight=w),
        "vocab_parallel_linear_cross_entropy": lambda: probact_gpu.distributed.
        vocab_parallel_linear_cross_entropy(hidden, head, t, weight=w),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="weight .*requires grad"):
            call()
        with torch.no_grad():  # as torch: nothing to differentiate, nothing refused
            call()
        assert w.grad is None, name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weight_requiring_grad_with_probabilities_gets_torchs_gradient(device, rng,
                                                                             reduction):
    """With class-probability targets torch differentiates w.r.t. the class weights: so do we,
    through cross_entropy and linear_cross_entropy (the latter gave none)."""
    n, c, h = 5, 6, 4
    x, _ = make_input((n, c), torch.float64, rng, device=device)
    hidden, _ = make_input((n, h), torch.float64, rng, device=device)
    head, _ = make_input((c, h), torch.float64, rng, device=device)
    p = _probs(rng, n, c, device)
    w0 = torch.rand(c, dtype=torch.float64, device=device) + 0.5
    kw = dict(reduction=reduction, label_smoothing=0.1)
    pairs = [
        (lambda w: probact_gpu.cross_entropy(x, p, w, **kw),
         lambda w: torch.nn.functional.cross_entropy(x, p, w, **kw)),
        (lambda w: probact_gpu.linear_cross_entropy(hidden, head, p, weight=w, **kw),
         lambda w: torch.nn.functional.cross_entropy(hidden @ head.T, p, w, **kw)),
    ]
    dy = torch.rand((n,) if reduction == "none" else (), dtype=torch.float64, device=device)
    for f_ours, f_torch in pairs:
        w_a, w_b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
        f_ours(w_a).backward(dy)
        f_torch(w_b).backward(dy)
        torch.testing.assert_close(w_a.grad, w_b.grad, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- soft targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_probability_targets_requiring_grad_get_their_gradient(device, rng, reduction):
    """Class-probability targets that require grad get d loss / d target through
    linear_cross_entropy, as through cross_entropy on the materialised logits and torch's
    F.linear_cross_entropy (it was None). Token chunks of 2 rows, every option that reaches the
    soft path, float64."""
    n, c, h = 5, 7, 4
    hidden, _ = make_input((n, h), torch.float64, rng, device=device)
    head, _ = make_input((c, h), torch.float64, rng, device=device)
    bias, _ = make_input((c,), torch.float64, rng, device=device)
    p0 = _probs(rng, n, c, device)
    w = torch.rand(c, dtype=torch.float64, device=device) + 0.5
    dy = torch.rand((n,) if reduction == "none" else (), dtype=torch.float64, device=device)
    options = [dict(), dict(weight=w, label_smoothing=0.2, z_loss=1e-2, softcap=3.0,
                            temperature=0.7, logit_scale=1.5)]
    for kw in options:
        kw = dict(kw, reduction=reduction)
        p_ours, p_ref = p0.clone().requires_grad_(), p0.clone().requires_grad_()
        probact_gpu.linear_cross_entropy(hidden, head, p_ours, linear_bias=bias, chunk_size=2,
                                         **kw).backward(dy)
        probact_gpu.cross_entropy(hidden @ head.T + bias, p_ref, **kw).backward(dy)
        assert p_ours.grad is not None
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-9, atol=1e-12)
    p_torch = p0.clone().requires_grad_()
    torch.nn.functional.linear_cross_entropy(hidden, head, p_torch, linear_bias=bias,
                                             reduction=reduction).backward(dy)
    p_ours = p0.clone().requires_grad_()
    probact_gpu.linear_cross_entropy(hidden, head, p_ours, linear_bias=bias,
                                     reduction=reduction).backward(dy)
    torch.testing.assert_close(p_ours.grad, p_torch.grad, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- z-loss, weights


def test_z_loss_under_class_weights_is_averaged_over_tokens(device, rng, world_of_one):
    """reduction="mean" with class weights: the z term is ``z_loss · Σ lse² / (non-ignored
    tokens)``, as the peers define it, so it does not scale with the weights' overall scale —
    doubling every weight left the CE term alone but halved the z term (Σ lse² was divided by
    Σ w_t). The same in cross_entropy (each path), linear_cross_entropy and the vocab-parallel
    forms (their world-size-1 Functions, on a group of this process); gradients too."""
    from probact_gpu.distributed import cross_entropy as vp
    from probact_gpu.ops.cross_entropy import cross_entropy_fwd
    from probact_gpu.options import CrossEntropyOptions
    from probact_gpu.tiling import RowConfig

    n, c, h, zeta = 6, 40, 8, 0.25
    hidden, _ = make_input((n, h), torch.float64, rng, device=device)
    head, _ = make_input((c, h), torch.float64, rng, device=device)
    t = _targets(rng, n, c, device)
    w = torch.rand(c, dtype=torch.float64, device=device) + 0.5
    logits = hidden @ head.T
    valid = t != IGNORE
    lse = torch.logsumexp(logits, 1)
    ce = torch.nn.functional.cross_entropy(logits, t, w)
    expected = ce + zeta * (lse[valid] ** 2).sum() / valid.sum()

    def grads_and_loss(f, *args):
        args = [a.clone().requires_grad_() for a in args]
        loss = f(*args)
        loss.backward(torch.tensor(0.75, dtype=torch.float64, device=device))
        return [loss.detach()] + [a.grad for a in args]

    def reference(scale):
        return grads_and_loss(lambda x: torch.nn.functional.cross_entropy(x, t, w * scale)
                              + zeta * (torch.logsumexp(x, 1)[valid] ** 2).mean(), logits)

    opts = dict(weight=w, z_loss=zeta)
    group = torch.distributed.group.WORLD
    calls = {
        "cross_entropy": (lambda x, s: probact_gpu.cross_entropy(x, t, w * s, z_loss=zeta),
                          [logits]),
        "cross_entropy split": (lambda x, s: _ce_split(x, t, w * s, zeta), [logits]),
        "linear_cross_entropy": (lambda a, b, s: probact_gpu.linear_cross_entropy(
            a, b, t, weight=w * s, z_loss=zeta, chunk_size=4), [hidden, head]),
        "linear_cross_entropy low_memory": (lambda a, b, s: probact_gpu.linear_cross_entropy(
            a, b, t, weight=w * s, z_loss=zeta, low_memory=True), [hidden, head]),
        "vocab_parallel_cross_entropy": (lambda x, s: vp.VocabParallelCrossEntropyFunction.apply(
            x, t, group, 0, c, CrossEntropyOptions.from_kwargs(weight=w * s, z_loss=zeta), None),
            [logits]),
        "vocab_parallel_linear_cross_entropy": (
            lambda a, b, s: vp.VocabParallelLinearCrossEntropyFunction.apply(
                a, b, None, t, group, 0, c, CrossEntropyOptions.from_kwargs(
                    weight=w * s, z_loss=zeta), (None, None, None)), [hidden, head]),
    }
    for name, (f, args) in calls.items():  # weights doubled: the loss expected of w itself
        ours = grads_and_loss(lambda *a, f=f: f(*a, 2.0), *args)
        torch.testing.assert_close(ours[0], expected, rtol=1e-9, atol=0, msg=name)
        if len(args) == 1:
            torch.testing.assert_close(ours[1], reference(2.0)[1], rtol=1e-9, atol=1e-15,
                                       msg=name)
    # The launcher's fused gradient with its own divisor, as linear + CE calls it.
    out = cross_entropy_fwd(logits, t, options=CrossEntropyOptions.from_kwargs(**opts),
                            compute_grad=True, config=RowConfig("multi", 16, 1))
    torch.testing.assert_close(out[2] * 0.75, reference(1.0)[1], rtol=1e-9, atol=1e-15)


def _ce_split(x, t, w, zeta):
    from probact_gpu.ops.cross_entropy import cross_entropy_fwd
    from probact_gpu.tiling import RowConfig

    class _Split(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            rows, _, grad = cross_entropy_fwd(x, t, weight=w, z_loss=zeta, compute_grad=True,
                                              config=RowConfig("split", 16, 1, n_splits=3))
            ctx.save_for_backward(grad)
            valid = t != IGNORE
            return rows.sum() / w[t[valid]].sum()

        @staticmethod
        def backward(ctx, g):
            return ctx.saved_tensors[0] * g

    return _Split.apply(x)


# ----------------------------------------------------------------------------- 16-bit gradients


def _rounding_misses(grad, ref64, dtype):
    """(fraction of elements that are not the correctly rounded float64 value, the largest
    miss in ulps of the dtype at that element)."""
    correct = torch.from_numpy(ref64).to(dtype)
    miss = grad.cpu() != correct
    spacing = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(
        correct.double().abs().clamp_min(torch.finfo(dtype).tiny))))
    ulps = ((grad.cpu().double() - correct.double()).abs() / spacing).max().item()
    return miss.double().mean().item(), ulps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cross_entropy_16bit_gradient_correctly_rounded_for_any_grad_output(device, rng, dtype):
    """The fused gradient of a reduced loss was stored in 16 bits for grad_output 1 and
    rescaled: for grad_output 0.37 (a loss scale, an accumulation divisor) about a quarter of the
    elements missed the correctly rounded value by an ulp. The out-of-place path now recomputes
    it from the logits when grad_output is not 1 (decided on the device). A few near-ties may
    still round the other way on the fp32 math (far below 1 %), never by more than one ulp."""
    from probact_gpu import reference
    from probact_gpu.testing import to_numpy64

    n, c = 8, 300
    x, x64 = make_input((n, c), dtype, rng, scale=2.0, device=device)
    t = _targets(rng, n, c, device)
    w = torch.rand(c, device=device) + 0.5
    g = torch.tensor(0.37, dtype=dtype, device=device)  # the loss's dtype, as autograd's
    for kw in (dict(), dict(weight=w, label_smoothing=0.1, z_loss=1e-3, reduction="sum")):
        xr = x.clone().requires_grad_()
        probact_gpu.cross_entropy(xr, t, **kw).backward(g)
        ref_kw = {k: v for k, v in kw.items() if k != "weight"}
        _, _, ref = reference.cross_entropy(x64, t.cpu().numpy(), None if "weight" not in kw
                                            else to_numpy64(w), IGNORE, dy=g.item(), **ref_kw)
        frac, ulps = _rounding_misses(xr.grad, ref, dtype)
        assert frac < 0.005 and ulps <= 1.0, (kw, frac, ulps)


def test_bce_16bit_gradient_correctly_rounded_for_any_grad_output(device, rng):
    """BCE-with-logits had the same double rounding (its fused gradient rescaled in place); it
    is now recomputed for a grad_output other than 1, on the device."""
    from probact_gpu import reference
    from probact_gpu.testing import make_bce_inputs, to_numpy64

    x, t, _, _ = make_bce_inputs((16, 100), torch.bfloat16, rng, device)
    g = torch.tensor(0.37, dtype=torch.bfloat16, device=device)
    for reduction in ("mean", "sum"):
        xr = x.clone().requires_grad_()
        probact_gpu.binary_cross_entropy_with_logits(xr, t, reduction=reduction).backward(g)
        ref = reference.bce_with_logits_grad(to_numpy64(x), to_numpy64(t), g.item(),
                                             reduction=reduction)
        frac, ulps = _rounding_misses(xr.grad, ref, torch.bfloat16)
        assert frac < 0.005 and ulps <= 1.0, (reduction, frac, ulps)


# ----------------------------------------------------------------------------- forward-mode AD
# Each op next to the same function in torch ops (float64, tiny shapes): (ours, torch's, the
# shapes of the differentiable arguments). Targets, options and weights are fixed inside.


def _torch_tlp(z, t, entropy):
    logp = torch.log_softmax(z, -1)
    keep = t != IGNORE
    out = logp.gather(-1, t.clamp(min=0)[:, None])[:, 0] * keep
    if entropy:
        out = out + 0.5 * (-(logp.exp() * logp).sum(-1)) * keep
    return out


def _op_pairs(device):
    f64 = dict(dtype=torch.float64, device=device)
    t = torch.tensor([1, IGNORE, 4, 0], device=device)
    w = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.75], **f64)
    p = torch.softmax(torch.arange(20, **f64).reshape(4, 5).sin(), 1)
    bce_t = torch.rand(4, 5, **f64)
    head_b = torch.linspace(-1, 1, 5, **f64)
    F = torch.nn.functional
    ce_kw = dict(weight=w, label_smoothing=0.1, z_loss=0.05)

    def ce_ref(z, reduction="mean"):
        valid = t != IGNORE
        lse = torch.logsumexp(z, 1)
        ce = F.cross_entropy(z, t, w, label_smoothing=0.1, reduction=reduction)
        if reduction == "none":
            return ce + 0.05 * lse**2 * valid
        return ce + 0.05 * (lse[valid] ** 2).mean()

    def tlp(x):
        out = probact_gpu.token_log_probs(x, t, temperature=0.7, return_entropy=True)
        return out.logprobs + 0.5 * out.entropy

    def ltlp(h, W, b):
        out = probact_gpu.linear_token_log_probs(h, W, t, linear_bias=b, softcap=3.0,
                                                 return_entropy=True, chunk_size=3)
        return out.logprobs + 0.5 * out.entropy

    teacher = torch.arange(20, **f64).reshape(4, 5).cos() * 2.0
    keep = t != IGNORE

    def kd_ref(z, divergence):
        logp, logq = torch.log_softmax(teacher / 0.8, -1), torch.log_softmax(z / 0.8, -1)
        if divergence == "kl":
            rows = (logp.exp() * (logp - logq)).sum(-1)
            ce = F.cross_entropy(z, t, reduction="none")
            return (rows + 0.3 * ce) * keep
        logm = torch.logsumexp(torch.stack([logp + math.log(0.3), logq + math.log(0.7)]), 0)
        rows = 0.3 * (logp.exp() * (logp - logm)).sum(-1) + 0.7 * (
            logq.exp() * (logq - logm)).sum(-1)
        return (rows * keep).sum() / keep.sum()

    return {
        "distillation kl none": (
            lambda x: probact_gpu.distillation_loss(x, teacher, t, temperature=0.8,
                                                    hard_weight=0.3, reduction="none"),
            lambda x: kd_ref(x, "kl"), [(4, 5)]),
        "distillation jsd": (
            lambda x: probact_gpu.distillation_loss(x, teacher, t, divergence="jsd", beta=0.3,
                                                    temperature=0.8),
            lambda x: kd_ref(x, "jsd"), [(4, 5)]),
        "softmax": (lambda x: probact_gpu.softmax(x, -1), lambda x: torch.softmax(x, -1),
                    [(4, 5)]),
        "log_softmax": (lambda x: probact_gpu.log_softmax(x, 0),
                        lambda x: torch.log_softmax(x, 0), [(4, 5)]),
        "sigmoid": (probact_gpu.sigmoid, torch.sigmoid, [(4, 5)]),
        "logsigmoid": (probact_gpu.logsigmoid, F.logsigmoid, [(4, 5)]),
        "bce": (lambda x: probact_gpu.binary_cross_entropy_with_logits(x, bce_t, pos_weight=w),
                lambda x: F.binary_cross_entropy_with_logits(x, bce_t, pos_weight=w),
                [(4, 5)]),
        "cross_entropy": (lambda x: probact_gpu.cross_entropy(x, t, **ce_kw), ce_ref, [(4, 5)]),
        "cross_entropy none": (lambda x: probact_gpu.cross_entropy(x, t, reduction="none",
                                                                   **ce_kw),
                               lambda x: ce_ref(x, "none"), [(4, 5)]),
        "cross_entropy soft": (lambda x: probact_gpu.cross_entropy(x, p, w),
                               lambda x: F.cross_entropy(x, p, w), [(4, 5)]),
        "token_log_probs": (tlp, lambda x: _torch_tlp(x / 0.7, t, True), [(4, 5)]),
        "linear_cross_entropy": (
            lambda h, W, b: probact_gpu.linear_cross_entropy(h, W, t, linear_bias=b,
                                                             chunk_size=3, **ce_kw),
            lambda h, W, b: ce_ref(h @ W.T + b), [(4, 3), (5, 3), (5,)]),
        "linear_token_log_probs": (
            ltlp, lambda h, W, b: _torch_tlp(3.0 * torch.tanh((h @ W.T + b) / 3.0), t, True),
            [(4, 3), (5, 3), (5,)]),
        "linear_cross_entropy soft": (
            lambda h, W: probact_gpu.linear_cross_entropy(h, W, p, linear_bias=head_b),
            lambda h, W: F.cross_entropy(h @ W.T + head_b, p), [(4, 3), (5, 3)]),
    }


OPS = list(_op_pairs("cpu"))


def _args(rng, shapes, device):
    return tuple(torch.from_numpy(rng.standard_normal(s)).to(device) for s in shapes)


@pytest.mark.parametrize("name", OPS)
def test_forward_mode_ad_gives_each_ops_tangent(device, rng, name):
    """torch.autograd.forward_ad and torch.func.jvp through every op give the tangent of the
    same function in torch ops (a torch.library op without a forward rule gave none: zero from
    torch.func.jvp, None from forward_ad). jacfwd too, on the ops' first argument."""
    import torch.autograd.forward_ad as fwAD

    ours, theirs, shapes = _op_pairs(device)[name]
    primals, tangents = _args(rng, shapes, device), _args(rng, shapes, device)
    _, expected = torch.func.jvp(theirs, primals, tangents)
    with fwAD.dual_level():
        out = ours(*(fwAD.make_dual(a, d) for a, d in zip(primals, tangents, strict=True)))
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, expected, rtol=1e-9, atol=1e-12)
    first = lambda a: ours(a, *primals[1:])  # noqa: E731  (jacfwd: vmap of torch.func.jvp)
    torch.testing.assert_close(torch.func.jacfwd(first)(primals[0]),
                               torch.func.jacrev(lambda a: theirs(a, *primals[1:]))(primals[0]),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", OPS)
def test_torch_func_reverse_transforms_every_op(device, rng, name):
    """torch.func.grad, jacrev and vmap(grad) through every op (they failed inside torch with
    "must override the setup_context staticmethod")."""
    ours, theirs, shapes = _op_pairs(device)[name]
    primals = _args(rng, shapes, device)
    weights = torch.from_numpy(rng.standard_normal(theirs(*primals).shape)).to(device)
    argnums = tuple(range(len(primals)))
    grads = torch.func.grad(lambda *a: (ours(*a) * weights).sum(), argnums)(*primals)
    expected = torch.func.grad(lambda *a: (theirs(*a) * weights).sum(), argnums)(*primals)
    torch.testing.assert_close(grads, expected, rtol=1e-9, atol=1e-12)
    if not name.startswith("linear"):  # (the same backward as grad's, vmapped over outputs)
        torch.testing.assert_close(torch.func.jacrev(ours)(*primals),
                                   torch.func.jacrev(theirs)(*primals), rtol=1e-9, atol=1e-12)
    batch = torch.stack([primals[0], primals[0] * 0.5 + 1.0])
    per_sample = torch.vmap(torch.func.grad(lambda a: (ours(a, *primals[1:]) * weights).sum()))
    per_sample_ref = torch.vmap(torch.func.grad(
        lambda a: (theirs(a, *primals[1:]) * weights).sum()))
    torch.testing.assert_close(per_sample(batch), per_sample_ref(batch), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "sigmoid", "logsigmoid", "bce",
                                  "cross_entropy", "token_log_probs", "linear_cross_entropy",
                                  "distillation jsd"])
def test_second_order_transforms_work_or_raise(device, rng, name):
    """torch.func.hessian: exact for the ops whose backward is differentiable (softmax,
    sigmoid, BCE); a clear error, never a silent zero, for those whose gradients come from
    kernels (the cross-entropy family)."""
    ours, theirs, shapes = _op_pairs(device)[name]
    x = _args(rng, shapes[:1], device)[0]
    rest = _args(rng, shapes[1:], device)
    weights = torch.from_numpy(rng.standard_normal(theirs(x, *rest).shape)).to(device)

    def scalar(f):
        return lambda a: (f(a, *rest) * weights).sum()

    if name in ("softmax", "log_softmax", "sigmoid", "logsigmoid", "bce"):
        torch.testing.assert_close(torch.func.hessian(scalar(ours))(x),
                                   torch.func.hessian(scalar(theirs))(x), rtol=1e-9,
                                   atol=1e-12)
        return
    with pytest.raises(RuntimeError, match="does not support second derivatives"):
        torch.func.hessian(scalar(ours))(x)


def test_forward_mode_ad_vocab_parallel_and_refusals(device, rng, world_of_one):
    """The vocab-parallel Functions (on a group of this process alone: their collectives run)
    give forward-mode tangents — each rank's share, all_reduced — and refuse torch.func with a
    message naming it; an in-place cross-entropy on logits that also require grad and a BCE
    target with a tangent are refused naming forward-mode AD / the argument."""
    import torch.autograd.forward_ad as fwAD

    from probact_gpu.distributed import cross_entropy as vp_ce
    from probact_gpu.distributed import token_log_probs as vp_tlp
    from probact_gpu.options import CrossEntropyOptions, HeadTransform

    group = torch.distributed.group.WORLD
    x, x_dot = _args(rng, [(4, 5), (4, 5)], device)
    h, W, h_dot, W_dot = _args(rng, [(4, 3), (5, 3), (4, 3), (5, 3)], device)
    t = _targets(rng, 4, 5, device)
    opts = CrossEntropyOptions.from_kwargs(label_smoothing=0.1, z_loss=0.05, reduction="none")
    transform = HeadTransform(temperature=0.7)
    calls = [
        (lambda a: vp_ce.VocabParallelCrossEntropyFunction.apply(a, t, group, 0, 5, opts, None),
         lambda a: probact_gpu.cross_entropy(a, t, **opts.as_kwargs()), (x,), (x_dot,)),
        (lambda a, b: vp_ce.VocabParallelLinearCrossEntropyFunction.apply(
            a, b, None, t, group, 0, 5, opts, (2, None, None)),
         lambda a, b: probact_gpu.cross_entropy(a @ b.T, t, **opts.as_kwargs()), (h, W),
         (h_dot, W_dot)),
        (lambda a: vp_tlp.VocabParallelTokenLogProbsFunction.apply(
            a, t, group, 0, 5, IGNORE, transform, True, False, None, False)[1],
         lambda a: probact_gpu.token_log_probs(a, t, temperature=0.7,
                                               return_entropy=True).entropy, (x,), (x_dot,)),
        (lambda a, b: vp_tlp.VocabParallelLinearTokenLogProbsFunction.apply(
            a, b, None, t, group, 0, 5, IGNORE, transform, False, False, 2, None, False)[0],
         lambda a, b: probact_gpu.token_log_probs(a @ b.T, t, temperature=0.7), (h, W),
         (h_dot, W_dot)),
    ]
    for ours, local, primals, tangents in calls:
        _, expected = torch.func.jvp(local, primals, tangents)
        with fwAD.dual_level():
            out = ours(*(fwAD.make_dual(a, d) for a, d in zip(primals, tangents, strict=True)))
            torch.testing.assert_close(fwAD.unpack_dual(out).tangent, expected, rtol=1e-9,
                                       atol=1e-12)
    with pytest.raises(RuntimeError, match="vocab_parallel_cross_entropy does not support "
                                           "torch.func transforms"):
        torch.func.grad(lambda a: probact_gpu.distributed.vocab_parallel_cross_entropy(
            a, t, vocab_start_index=0, vocab_size=5))(x)
    with fwAD.dual_level():
        logits = fwAD.make_dual(x.clone().requires_grad_(), x_dot) * 1.0
        with pytest.raises(RuntimeError, match="does not support forward-mode AD"):
            probact_gpu.cross_entropy(logits, t, inplace_backward=True)
        with pytest.raises(NotImplementedError, match="target has a forward-mode tangent"):
            probact_gpu.binary_cross_entropy_with_logits(x, fwAD.make_dual(x.sigmoid(), x_dot))


# ----------------------------------------------------------------------------- tensor options


def _factors(device, scale=1.3, divisor=0.8, temperature=1.6):
    """0-d float64 tensors that require grad: logit_scale, logit_divisor, temperature."""
    return [torch.tensor(v, dtype=torch.float64, device=device, requires_grad=True)
            for v in (scale, divisor, temperature)]


def _transformed(x, s, d, temp, softcap=None):
    """The head transform as torch users compose it: softcap(x · s / d) / T."""
    z = x * s / d
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temp


def _torch_logp(z, t):
    safe = t.clamp(min=0)
    logp = torch.log_softmax(z, -1).gather(-1, safe[:, None])[:, 0]
    return torch.where(t == IGNORE, torch.zeros_like(logp), logp)


def _check_grads(ours, theirs, inputs, dy=None):
    """Loss and the gradient of every tensor in ``inputs`` from ``ours`` against ``theirs``
    (float64 torch), under a random-looking upstream gradient for unreduced outputs."""
    out, ref = ours(*inputs), theirs(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    dy = torch.linspace(0.5, 1.5, ref.numel(), dtype=ref.dtype, device=ref.device).reshape(
        ref.shape) if dy is None else dy
    used = [a for a in inputs if a.requires_grad]
    got = torch.autograd.grad(out, used, dy, allow_unused=True)
    expected = torch.autograd.grad(ref, used, dy, allow_unused=True)
    for g, e in zip(got, expected, strict=True):
        assert g is not None, "an input that requires grad got no gradient"
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def _tensor_option_cases(rng, device):
    """name -> (ours(*inputs), theirs(*inputs), inputs): every local op family, with tensor
    logit_scale, logit_divisor and temperature that require grad (float64 throughout)."""
    F = torch.nn.functional
    n, c, hid = 5, 24, 6
    x, _ = make_input((n, c), torch.float64, rng, device=device)
    h, _ = make_input((n, hid), torch.float64, rng, device=device)
    W, _ = make_input((c, hid), torch.float64, rng, device=device)
    b, _ = make_input((c,), torch.float64, rng, device=device)
    t = _targets(rng, n, c, device)
    s, d, temp = _factors(device)
    x, h, W, b = (a.requires_grad_() for a in (x, h, W, b))
    cases = {}
    for reduction in ("mean", "sum", "none"):
        cases[f"cross_entropy {reduction}"] = (
            lambda x, s, d, temp, r=reduction: probact_gpu.cross_entropy(
                x, t, reduction=r, logit_scale=s, logit_divisor=d, temperature=temp),
            lambda x, s, d, temp, r=reduction: F.cross_entropy(_transformed(x, s, d, temp), t,
                                                               reduction=r),
            (x, s, d, temp))
    cases["cross_entropy softcap"] = (  # the pre-softcap factors with a softcap
        lambda x, s, d: probact_gpu.cross_entropy(x, t, label_smoothing=0.1, softcap=2.0,
                                                  logit_scale=s, logit_divisor=d,
                                                  temperature=0.7),
        lambda x, s, d: F.cross_entropy(_transformed(x, s, d, 0.7, 2.0), t,
                                        label_smoothing=0.1),
        (x, s, d))
    cases["linear_cross_entropy"] = (
        lambda h, W, b, s, d, temp: probact_gpu.linear_cross_entropy(
            h, W, t, linear_bias=b, reduction="sum", logit_scale=s, logit_divisor=d,
            temperature=temp, chunk_size=2),
        lambda h, W, b, s, d, temp: F.cross_entropy(_transformed(h @ W.T + b, s, d, temp), t,
                                                    reduction="sum"),
        (h, W, b, s, d, temp))
    cases["linear_cross_entropy softcap"] = (
        lambda h, W, b, s: probact_gpu.linear_cross_entropy(h, W, t, linear_bias=b, softcap=3.0,
                                                            logit_scale=s),
        lambda h, W, b, s: F.cross_entropy(_transformed(h @ W.T + b, s, 1.0, 1.0, 3.0), t),
        (h, W, b, s))
    cases["token_log_probs"] = (
        lambda x, s, d, temp: probact_gpu.token_log_probs(
            x, t, logit_scale=s, logit_divisor=d, temperature=temp, return_entropy=True).entropy
        + probact_gpu.token_log_probs(x, t, logit_scale=s, logit_divisor=d, temperature=temp),
        lambda x, s, d, temp: _torch_logp(_transformed(x, s, d, temp), t) - (
            torch.softmax(z := _transformed(x, s, d, temp), -1)
            * torch.log_softmax(z, -1)).sum(-1) * (t != IGNORE),
        (x, s, d, temp))
    cases["linear_token_log_probs"] = (
        lambda h, W, b, s, d, temp: probact_gpu.linear_token_log_probs(
            h, W, t, linear_bias=b, logit_scale=s, logit_divisor=d, temperature=temp,
            chunk_size=2),
        lambda h, W, b, s, d, temp: _torch_logp(_transformed(h @ W.T + b, s, d, temp), t),
        (h, W, b, s, d, temp))
    return cases


TENSOR_OPTION_CASES = list(_tensor_option_cases(np.random.default_rng(0), "cpu"))


@pytest.mark.parametrize("name", TENSOR_OPTION_CASES)
def test_tensor_logit_options_get_their_gradient(device, rng, name):
    """A 0-d tensor logit_scale / logit_divisor / temperature that requires grad gets the
    gradient of the torch composition users come from (``F.cross_entropy(x * s / d / T)``),
    with the logits', hidden states', head's and bias' gradients; before, each was read with
    .item() and got none."""
    ours, theirs, inputs = _tensor_option_cases(rng, device)[name]
    _check_grads(ours, theirs, inputs)


def test_tensor_logit_options_vocab_parallel(device, rng, world_of_one):
    """The vocab-parallel forms (on a group of this process): the same gradients."""
    from probact_gpu import distributed as vp

    F = torch.nn.functional
    n, c, hid = 4, 20, 5
    x, _ = make_input((n, c), torch.float64, rng, device=device)
    h, _ = make_input((n, hid), torch.float64, rng, device=device)
    W, _ = make_input((c, hid), torch.float64, rng, device=device)
    b, _ = make_input((c,), torch.float64, rng, device=device)
    t = _targets(rng, n, c, device)
    s, d, temp = _factors(device)
    x, h, W, b = (a.requires_grad_() for a in (x, h, W, b))
    _check_grads(lambda x, s, temp: vp.vocab_parallel_cross_entropy(
        x, t, reduction="none", logit_scale=s, temperature=temp),
        lambda x, s, temp: F.cross_entropy(_transformed(x, s, 1.0, temp), t, reduction="none"),
        (x, s, temp))
    _check_grads(lambda h, W, b, s, d: vp.vocab_parallel_linear_cross_entropy(
        h, W, t, linear_bias=b, logit_scale=s, logit_divisor=d, softcap=2.5),
        lambda h, W, b, s, d: F.cross_entropy(_transformed(h @ W.T + b, s, d, 1.0, 2.5), t),
        (h, W, b, s, d))
    _check_grads(lambda x, d, temp: vp.vocab_parallel_token_log_probs(
        x, t, logit_divisor=d, temperature=temp),
        lambda x, d, temp: _torch_logp(_transformed(x, 1.0, d, temp), t), (x, d, temp))
    _check_grads(lambda h, W, b, s, temp: vp.vocab_parallel_linear_token_log_probs(
        h, W, t, linear_bias=b, logit_scale=s, temperature=temp),
        lambda h, W, b, s, temp: _torch_logp(_transformed(h @ W.T + b, s, 1.0, temp), t),
        (h, W, b, s, temp))


def _torch_kl(student, teacher, t, temperature):
    """KL(P‖Q) per token at ``temperature``, averaged over the kept tokens."""
    lp = torch.log_softmax(teacher / temperature, -1)
    lq = torch.log_softmax(student / temperature, -1)
    rows = (lp.exp() * (lp - lq)).sum(-1) * (t != IGNORE)
    return rows.sum() / (t != IGNORE).sum()


def test_tensor_student_options_distillation_get_their_gradient(device, rng):
    """distillation_loss and linear_distillation_loss: a tensor student_logit_scale /
    student_logit_divisor gets its gradient (the hard term sees the same scaled student)."""
    F = torch.nn.functional
    n, c, hid = 5, 16, 4
    xs, _ = make_input((n, c), torch.float64, rng, device=device)
    xt, _ = make_input((n, c), torch.float64, rng, device=device)
    h, _ = make_input((n, hid), torch.float64, rng, device=device)
    W, _ = make_input((c, hid), torch.float64, rng, device=device)
    b, _ = make_input((c,), torch.float64, rng, device=device)
    ht, _ = make_input((n, hid), torch.float64, rng, device=device)
    t = _targets(rng, n, c, device)
    s, d, _ = _factors(device)
    xs, h, W, b = (a.requires_grad_() for a in (xs, h, W, b))
    _check_grads(lambda xs, s, d: probact_gpu.distillation_loss(
        xs, xt, t, temperature=1.5, hard_weight=0.3, student_logit_scale=s,
        student_logit_divisor=d),
        lambda xs, s, d: _torch_kl(xs * s / d, xt, t, 1.5)
        + 0.3 * F.cross_entropy(xs * s / d, t), (xs, s, d))
    _check_grads(lambda h, W, b, s: probact_gpu.linear_distillation_loss(
        h, W, ht, W.detach(), t, student_bias=b, temperature=2.0, student_logit_scale=s,
        chunk_size=2),
        lambda h, W, b, s: _torch_kl((h @ W.T + b) * s, ht @ W.detach().T, t, 2.0),
        (h, W, b, s))


def test_tensor_logit_scale_parameter_of_a_module_gets_its_gradient(device, rng):
    """CLIP-style: an nn.Parameter logit_scale on CrossEntropyLoss / LinearCrossEntropyLoss is a
    parameter of the module and gets its gradient."""
    F = torch.nn.functional
    n, c, hid = 4, 12, 5
    x, _ = make_input((n, c), torch.float64, rng, device=device)
    h, _ = make_input((n, hid), torch.float64, rng, device=device)
    W, _ = make_input((c, hid), torch.float64, rng, device=device)
    t = _targets(rng, n, c, device)
    for module, run, logits in (
            (probact_gpu.CrossEntropyLoss(logit_scale=torch.nn.Parameter(
                torch.tensor(2.0, dtype=torch.float64, device=device))), lambda m: m(x, t), x),
            (probact_gpu.LinearCrossEntropyLoss(temperature=torch.nn.Parameter(
                torch.tensor(0.5, dtype=torch.float64, device=device)), reduction="sum"),
             lambda m: m(h, W, t), h @ W.T)):
        (param,) = module.parameters()
        run(module).backward()
        if module.temperature is param:
            expected = F.cross_entropy(logits / param, t, reduction="sum")
        else:
            expected = F.cross_entropy(logits * param, t)
        (g,) = torch.autograd.grad(expected, param)
        torch.testing.assert_close(param.grad, g, rtol=1e-9, atol=1e-12)


def test_tensor_logit_options_read_nothing_on_the_host(device, rng, monkeypatch):
    """No .item() on the path of a tensor option (a device sync on a GPU; a graph break under
    torch.compile), forward or backward; a tensor that does not require grad is folded too."""
    n, c, hid = 4, 12, 5
    x, _ = make_input((n, c), torch.float32, rng, device=device)
    h, _ = make_input((n, hid), torch.float32, rng, device=device)
    W, _ = make_input((c, hid), torch.float32, rng, device=device)
    t = _targets(rng, n, c, device)
    s = torch.tensor(1.5, device=device, requires_grad=True)
    fixed = torch.tensor(0.75, device=device)
    x, h = x.requires_grad_(), h.requires_grad_()
    ref = probact_gpu.cross_entropy(x, t, logit_scale=1.5, temperature=0.75)

    def no_item(self):
        raise AssertionError("Tensor.item() called")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    loss = probact_gpu.cross_entropy(x, t, logit_scale=s, temperature=fixed)
    loss = loss + probact_gpu.linear_cross_entropy(h, W, t, logit_divisor=s, temperature=fixed)
    loss = loss + probact_gpu.token_log_probs(x, t, logit_scale=s).sum()
    loss.backward()
    monkeypatch.undo()
    assert s.grad is not None
    torch.testing.assert_close(probact_gpu.cross_entropy(x, t, logit_scale=s, temperature=fixed),
                               ref)


def test_tensor_options_refused_where_no_gradient_can_be_given(device, rng):
    """Clear errors, never a silent missing gradient: a softcap that requires grad; a tensor
    temperature after a softcap (not a rescale of the logits); inplace_backward with a tensor
    factor (the product, not the caller's logits, would hold the gradient); distillation's
    temperature and teacher options that require grad (the teacher gets no gradient)."""
    n, c = 4, 12
    x, _ = make_input((n, c), torch.float32, rng, device=device)
    t = _targets(rng, n, c, device)
    g = torch.tensor(2.0, device=device, requires_grad=True)
    plain = torch.tensor(2.0, device=device)
    with pytest.raises(RuntimeError, match="softcap is a tensor that requires grad"):
        probact_gpu.cross_entropy(x, t, softcap=g)
    with pytest.raises(RuntimeError, match="softcap is a tensor that requires grad"):
        probact_gpu.CrossEntropyLoss(softcap=torch.nn.Parameter(plain.clone()))
    with pytest.raises(ValueError, match="temperature is a tensor and softcap is set"):
        probact_gpu.token_log_probs(x, t, softcap=3.0, temperature=plain)
    with pytest.raises(ValueError, match="inplace_backward=True .*tensor"):
        probact_gpu.cross_entropy(x.clone().requires_grad_() * 1.0, t, logit_scale=plain,
                                  inplace_backward=True)
    with pytest.raises(TypeError, match="logit_scale must be a number or a 0-d floating"):
        probact_gpu.cross_entropy(x, t, logit_scale=torch.ones(2, device=device))
    for name in ("temperature", "teacher_logit_scale", "student_softcap"):
        with pytest.raises(RuntimeError, match=f"{name} is a tensor that requires grad"):
            probact_gpu.distillation_loss(x, x.flip(0), t, **{name: g})
    # a distillation temperature without grad is read as a number, as before
    torch.testing.assert_close(probact_gpu.distillation_loss(x, x.flip(0), t, temperature=plain),
                               probact_gpu.distillation_loss(x, x.flip(0), t, temperature=2.0))


def test_tensor_student_scale_parameter_of_distillation_loss_module(device, rng):
    """DistillationLoss keeps an nn.Parameter student_logit_scale as its parameter and passes it
    on, so it gets its gradient (its options held the number, read once)."""
    n, c = 4, 10
    xs, _ = make_input((n, c), torch.float64, rng, device=device)
    xt, _ = make_input((n, c), torch.float64, rng, device=device)
    t = _targets(rng, n, c, device)
    module = probact_gpu.DistillationLoss(student_logit_scale=torch.nn.Parameter(
        torch.tensor(1.5, dtype=torch.float64, device=device)), temperature=2.0)
    (param,) = module.parameters()
    module(xs, xt, t).backward()
    (g,) = torch.autograd.grad(_torch_kl(xs * param, xt, t, 2.0), param)
    torch.testing.assert_close(param.grad, g, rtol=1e-9, atol=1e-12)


def test_distillation_top_k_forward_mode_and_refusals(device, rng):
    """The top-k teacher's forward-mode tangent is its reverse-mode gradient against the
    tangent (the same backward kernel); a teacher tangent and the fused linear form's
    transforms are refused by name (they gave a silent zero / torch's internal error)."""
    import torch.autograd.forward_ad as fwAD

    x = torch.from_numpy(rng.standard_normal((4, 9))).to(device)
    v = torch.from_numpy(rng.standard_normal((4, 9))).to(device)
    idx = torch.tensor([[0, 3], [1, 2], [8, 4], [5, 6]], device=device)
    teacher = probact_gpu.TopKTeacher(idx, torch.full((4, 2), -0.9, dtype=torch.float64,
                                                      device=device))
    t = torch.tensor([1, IGNORE, 4, 0], device=device)

    def loss(z):
        return probact_gpu.distillation_loss(z, teacher, t, divergence="reverse_kl")

    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(xr), xr)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(loss(fwAD.make_dual(x, v))).tangent
    torch.testing.assert_close(tangent, (grad * v).sum(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.func.grad(loss)(x), grad, rtol=1e-9, atol=1e-12)
    dense = x.flip(0)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="teacher has a forward-mode"):
        probact_gpu.distillation_loss(x, fwAD.make_dual(dense, v))
    h = torch.from_numpy(rng.standard_normal((4, 3))).to(device)
    w = torch.from_numpy(rng.standard_normal((9, 3))).to(device)
    with pytest.raises(RuntimeError, match="linear_distillation_loss supports reverse-mode"):
        torch.func.grad(lambda a: probact_gpu.linear_distillation_loss(a, w, h, w.flip(0)))(h)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="reverse-mode autograd only"):
        probact_gpu.linear_distillation_loss(fwAD.make_dual(h, h), w, h, w.flip(0))

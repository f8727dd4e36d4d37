"""Edges every public op must handle as torch does: empty inputs (a size-0 dim anywhere), meta
tensors (shape inference, forward and backward) and autocast. Each case runs our op and the torch
composition users come from on the same inputs and compares shape, dtype and values (NaN where
torch has NaN), then the gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import probact_gpu as pg

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter's inf − inf lanes


def _tlp_ref(logits, target, **kw):
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, target.clamp(min=0)[..., None])[..., 0].masked_fill(target == -100, 0)


def _lin(h, w):
    return h @ w.T


# name → (ours(x, *extra), torch's(x, *extra), input shape, extra tensors' builders). ``x``
# requires grad; the extras are built from the input's shape.
def _index_target(shape, c_dim=1):
    return torch.zeros(shape[:c_dim] + shape[c_dim + 1:], dtype=torch.long)


def _cases():
    ce = pg.cross_entropy
    w = torch.randn(5, 4)
    return {
        "softmax (2, 0, 5) dim -1": (lambda x: pg.softmax(x, -1), lambda x: torch.softmax(x, -1),
                                     (2, 0, 5)),
        "softmax (3, 0) dim 1": (lambda x: pg.softmax(x, 1), lambda x: torch.softmax(x, 1),
                                 (3, 0)),
        "log_softmax (0, 7) dim 0": (lambda x: pg.log_softmax(x, 0),
                                     lambda x: torch.log_softmax(x, 0), (0, 7)),
        "sigmoid (2, 0)": (pg.sigmoid, torch.sigmoid, (2, 0)),
        "logsigmoid (0,)": (pg.logsigmoid, F.logsigmoid, (0,)),
        "bce mean (0, 5)": (lambda x: pg.binary_cross_entropy_with_logits(x, torch.rand(x.shape)),
                            lambda x: F.binary_cross_entropy_with_logits(x, torch.rand(x.shape)),
                            (0, 5)),
        "bce none (2, 0, 3)": (
            lambda x: pg.binary_cross_entropy_with_logits(x, torch.rand(x.shape), reduction="none",
                                                          pos_weight=torch.ones(3)),
            lambda x: F.binary_cross_entropy_with_logits(x, torch.rand(x.shape), reduction="none",
                                                         pos_weight=torch.ones(3)), (2, 0, 3)),
        "ce mean (0, 5)": (lambda x: ce(x, _index_target(x.shape)),
                           lambda x: F.cross_entropy(x, _index_target(x.shape)), (0, 5)),
        "ce sum (0, 5) smoothing weight": (
            lambda x: ce(x, _index_target(x.shape), torch.ones(5), reduction="sum",
                         label_smoothing=0.1),
            lambda x: F.cross_entropy(x, _index_target(x.shape), torch.ones(5), reduction="sum",
                                      label_smoothing=0.1), (0, 5)),
        "ce none (2, 5, 3, 0)": (
            lambda x: ce(x, _index_target(x.shape), reduction="none"),
            lambda x: F.cross_entropy(x, _index_target(x.shape), reduction="none"), (2, 5, 3, 0)),
        "ce mean (2, 5, 0, 3)": (lambda x: ce(x, _index_target(x.shape)),
                                 lambda x: F.cross_entropy(x, _index_target(x.shape)),
                                 (2, 5, 0, 3)),
        "ce sum (2, 5, 0) z_loss": (
            lambda x: ce(x, _index_target(x.shape), reduction="sum", z_loss=0.1),
            lambda x: F.cross_entropy(x, _index_target(x.shape), reduction="sum"), (2, 5, 0)),
        "ce in place mean (0, 5)": (
            lambda x: ce(x * 1.0, _index_target(x.shape), inplace_backward=True),
            lambda x: F.cross_entropy(x, _index_target(x.shape)), (0, 5)),
        "ce probabilities mean (0, 5)": (
            lambda x: ce(x, torch.zeros(x.shape)), lambda x: F.cross_entropy(x, torch.zeros(
                x.shape)), (0, 5)),
        "linear ce mean (0, 4)": (
            lambda x: pg.linear_cross_entropy(x, w, _index_target(x.shape, x.ndim - 1)),
            lambda x: F.cross_entropy(_lin(x, w), _index_target(x.shape, x.ndim - 1)), (0, 4)),
        "linear ce none (2, 0, 4)": (
            lambda x: pg.linear_cross_entropy(x, w, _index_target(x.shape, x.ndim - 1),
                                              reduction="none"),
            lambda x: F.cross_entropy(_lin(x, w).transpose(1, 2),
                                      _index_target(x.shape, x.ndim - 1), reduction="none"),
            (2, 0, 4)),
        "token_log_probs (2, 0, 5)": (
            lambda x: pg.token_log_probs(x, _index_target(x.shape, x.ndim - 1)),
            lambda x: _tlp_ref(x, _index_target(x.shape, x.ndim - 1)), (2, 0, 5)),
        "token_log_probs entropy (0, 5)": (
            lambda x: pg.token_log_probs(x, _index_target(x.shape, x.ndim - 1),
                                         return_entropy=True).logprobs,
            lambda x: _tlp_ref(x, _index_target(x.shape, x.ndim - 1)), (0, 5)),
        "linear_token_log_probs (2, 0, 4)": (
            lambda x: pg.linear_token_log_probs(x, w, _index_target(x.shape, x.ndim - 1)),
            lambda x: _tlp_ref(_lin(x, w), _index_target(x.shape, x.ndim - 1)), (2, 0, 4)),
        "distillation kl none (2, 0, 5)": (
            lambda x: pg.distillation_loss(x, x.detach().flip(-1), reduction="none"),
            lambda x: _kl_ref(x, x.detach().flip(-1)), (2, 0, 5)),
        "distillation jsd mean (0, 5)": (  # no token kept: 0, as TRL (documented)
            lambda x: pg.distillation_loss(x, x.detach() * 2, divergence="jsd"),
            lambda x: _kl_ref(x, x.detach() * 2).sum() * 0.0, (0, 5)),
        "linear distillation sum (0, 4)": (
            lambda x: pg.linear_distillation_loss(x, w, x.detach(), w.flip(0),
                                                  reduction="sum"),
            lambda x: _kl_ref(_lin(x, w), _lin(x.detach(), w.flip(0))).sum(), (0, 4)),
    }


def _kl_ref(student, teacher):
    """KL(teacher || student) per token, the distillation default (P is the teacher)."""
    q, p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    return (p.exp() * (p - q)).sum(-1)


EMPTY = _cases()


def _assert_same(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    torch.testing.assert_close(ours, ref, equal_nan=True)


@pytest.mark.parametrize("name", list(EMPTY))
def test_empty_inputs_give_torchs_empty_results(name):
    """A size-0 dim anywhere — before the class dim too, which once sent the row-view helper into
    infinite recursion (token_log_probs on (B, 0, V), cross-entropy on (N, C, d, 0)) — gives
    torch's result: empty outputs, NaN for an empty mean, 0 for a sum, empty gradients."""
    ours_fn, ref_fn, shape = EMPTY[name]
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ours, ref = ours_fn(x), ref_fn(x_ref)
    _assert_same(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    _assert_same(x.grad, x_ref.grad)


# --------------------------------------------------------------------------- meta tensors


def _meta_cases():
    """name → fn(device) -> (output, [tensors whose gradients the backward of output.sum()
    gives]); every public op and each path its autograd takes."""
    def x(device, *shape, dtype=torch.float32):
        g = torch.Generator().manual_seed(len(shape))
        return torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_()

    def t(device, n, c=5):
        return (torch.arange(n) % c).to(device)

    def probs(device, *shape):
        return torch.softmax(torch.randn(shape), -1).to(device)

    def head(device, fn, **kw):
        h, w = x(device, 3, 4, dtype=torch.bfloat16), x(device, 5, 4, dtype=torch.bfloat16)
        b = x(device, 5, dtype=torch.bfloat16)
        return fn(h, w, t(device, 3), linear_bias=b, **kw), [h, w, b]

    def one(fn, *shape, dtype=torch.float32):
        def case(device):
            a = x(device, *shape, dtype=dtype)
            return fn(a, device), [a]
        return case

    ce, lce = pg.cross_entropy, pg.linear_cross_entropy
    return {
        "softmax": one(lambda a, d: pg.softmax(a, 0), 3, 5),
        "log_softmax bf16 → fp32": one(lambda a, d: pg.log_softmax(a, -1, dtype=torch.float32),
                                       3, 5, dtype=torch.bfloat16),
        "sigmoid": one(lambda a, d: pg.sigmoid(a), 3, 5),
        "logsigmoid": one(lambda a, d: pg.logsigmoid(a), 3, 5),
        "bce mean": one(lambda a, d: pg.binary_cross_entropy_with_logits(
            a, probs(d, 3, 5).to(a.dtype)), 3, 5, dtype=torch.bfloat16),
        "bce none": one(lambda a, d: pg.binary_cross_entropy_with_logits(
            a, probs(d, 3, 5), reduction="none"), 3, 5),
        "ce mean": one(lambda a, d: ce(a, t(d, 3)), 3, 5, dtype=torch.bfloat16),
        "ce sum lse": one(lambda a, d: ce(a, t(d, 3), reduction="sum", return_lse=True)[0],
                          3, 5),
        "ce none (N, C, d)": one(lambda a, d: ce(a, t(d, 6).view(3, 2), reduction="none"),
                                 3, 5, 2),
        "ce probabilities": one(lambda a, d: ce(a, probs(d, 3, 5)), 3, 5),
        "ce in place mean": one(lambda a, d: ce(a * 1.0, t(d, 3), inplace_backward=True), 3, 5),
        "ce in place none": one(lambda a, d: ce(a * 1.0, t(d, 3), reduction="none",
                                                inplace_backward=True), 3, 5),
        "linear ce mean": lambda d: head(d, lce),
        "linear ce none": lambda d: head(d, lce, reduction="none"),
        "linear ce low_memory": lambda d: head(d, lce, low_memory=True),
        "linear ce probabilities": lambda d: (lambda h, w: (lce(h, w, probs(d, 3, 5)), [h, w]))(
            x(d, 3, 4), x(d, 5, 4)),
        "token_log_probs entropy": one(lambda a, d: pg.token_log_probs(
            a, t(d, 3), return_entropy=True).entropy, 3, 5),
        "linear_token_log_probs": lambda d: head(d, pg.linear_token_log_probs),
        "distillation jsd mean": one(lambda a, d: pg.distillation_loss(
            a, x(d, 3, 5).detach(), t(d, 3), divergence="jsd"), 3, 5, dtype=torch.bfloat16),
        "distillation top-k none": one(lambda a, d: pg.distillation_loss(
            a, pg.TopKTeacher(t(d, 6).view(3, 2), torch.full((3, 2), -0.7, device=d)),
            reduction="none"), 3, 5),
        "linear distillation mean": lambda d: (lambda h, w: (pg.linear_distillation_loss(
            h, w, h.detach(), w.detach().flip(0), t(d, 3)), [h, w]))(x(d, 3, 4), x(d, 5, 4)),
        "linear distillation none": lambda d: (lambda h, w: (pg.linear_distillation_loss(
            h, w, h.detach(), w.detach().flip(0), divergence="tvd", reduction="none"),
            [h, w]))(x(d, 3, 4), x(d, 5, 4)),
    }


META = _meta_cases()


@pytest.mark.parametrize("name", list(META))
def test_meta_tensors_infer_what_the_op_computes(name):
    """Every op on meta tensors, forward and backward: the shapes and dtypes of the output and
    the gradients are those of the same call on real tensors, and nothing is launched (the
    cross-entropy mean/sum backward once launched its rescale kernel on meta storage;
    linear_cross_entropy refused meta input)."""
    from probact_gpu.testing import record_launches

    real, real_inputs = META[name]("cpu")
    real.sum().backward()
    with record_launches() as launches:
        meta, meta_inputs = META[name]("meta")
        meta.sum().backward()
    assert not launches
    assert meta.is_meta and (meta.shape, meta.dtype) == (real.shape, real.dtype)
    for a, b in zip(meta_inputs, real_inputs, strict=True):
        assert a.grad.is_meta and (a.grad.shape, a.grad.dtype) == (b.grad.shape, b.grad.dtype)


# --------------------------------------------------------------------------- autocast

# our op → the aten ops autocast decides it by (its policy per device type is torch's): on CUDA
# cross_entropy_loss decomposes into log_softmax and nll_loss, each run in float32 there
_ATEN = {"softmax": ("aten::softmax.int",), "log_softmax": ("aten::log_softmax.int",),
         "sigmoid": ("aten::sigmoid",), "logsigmoid": ("aten::log_sigmoid",),
         "binary_cross_entropy_with_logits": ("aten::binary_cross_entropy_with_logits",),
         "cross_entropy": ("aten::cross_entropy_loss", "aten::nll_loss"),
         "distillation_loss": ("aten::kl_div",)}


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_autocast_fp32_table_is_torchs(device_type):
    """The ops we run in float32 under autocast are exactly those torch's autocast registers a
    (float32) policy for, per device type — checked against torch's dispatcher, so the CUDA
    table is checked on a CPU-only machine too; F.linear (the fused heads) is cast down."""
    from probact_gpu._runtime import AUTOCAST_FP32_OPS

    key = "AutocastCUDA" if device_type == "cuda" else "AutocastCPU"
    registered = {op for op, names in _ATEN.items()
                  if any(torch._C._dispatch_has_kernel_for_dispatch_key(n, key) for n in names)}
    assert AUTOCAST_FP32_OPS[device_type] == registered
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::linear", key)


def _autocast_cases():
    """name → (ours(tensors), torch's(tensors), input builders); each runs under autocast."""
    def t(n, c=5):
        return torch.arange(n) % c

    def probs(*shape):  # the same values for ours and torch's
        return torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(1)), -1)

    bf16, f32 = torch.bfloat16, torch.float32
    ce = pg.cross_entropy
    return {
        "softmax": (lambda x: pg.softmax(x, -1), lambda x: torch.softmax(x, -1), [(3, 5, bf16)]),
        "log_softmax fp32": (lambda x: pg.log_softmax(x, 0), lambda x: torch.log_softmax(x, 0),
                             [(3, 5, f32)]),
        "sigmoid": (pg.sigmoid, torch.sigmoid, [(3, 5, bf16)]),
        "logsigmoid": (pg.logsigmoid, F.logsigmoid, [(3, 5, bf16)]),
        "bce mean, bf16 target": (
            lambda x: pg.binary_cross_entropy_with_logits(x, probs(3, 5).to(bf16)),
            lambda x: F.binary_cross_entropy_with_logits(x, probs(3, 5).to(bf16)),
            [(3, 5, bf16)]),
        "bce none": (
            lambda x: pg.binary_cross_entropy_with_logits(x, probs(3, 5).to(bf16),
                                                          reduction="none"),
            lambda x: F.binary_cross_entropy_with_logits(x, probs(3, 5).to(bf16),
                                                         reduction="none"), [(3, 5, bf16)]),
        "ce mean": (lambda x: ce(x, t(3)), lambda x: F.cross_entropy(x, t(3)), [(3, 5, bf16)]),
        "ce none smoothing": (
            lambda x: ce(x, t(3), reduction="none", label_smoothing=0.1),
            lambda x: F.cross_entropy(x, t(3), reduction="none", label_smoothing=0.1),
            [(3, 5, bf16)]),
        "ce sum lse": (lambda x: ce(x, t(3), reduction="sum", return_lse=True)[0],
                       lambda x: F.cross_entropy(x, t(3), reduction="sum"), [(3, 5, bf16)]),
        "ce probabilities": (lambda x: ce(x, probs(3, 5).to(bf16)),
                             lambda x: F.cross_entropy(x, probs(3, 5).to(bf16)), [(3, 5, bf16)]),
        "ce in place": (lambda x: ce(x * 1.0, t(3), inplace_backward=True),
                        lambda x: F.cross_entropy(x * 1.0, t(3)), [(3, 5, bf16)]),
        "ce fp64 stays fp64": (lambda x: ce(x, t(3)), lambda x: F.cross_entropy(x, t(3)),
                               [(3, 5, torch.float64)]),
        "linear ce": (lambda h, w, b: pg.linear_cross_entropy(h, w, t(3), linear_bias=b),
                      lambda h, w, b: F.cross_entropy(F.linear(h, w, b), t(3)),
                      [(3, 8, f32), (5, 8, f32), (5, f32)]),
        "linear ce none": (
            lambda h, w: pg.linear_cross_entropy(h, w, t(3), reduction="none"),
            lambda h, w: F.cross_entropy(F.linear(h, w), t(3), reduction="none"),
            [(3, 8, f32), (5, 8, f32)]),
        "linear ce probabilities": (
            lambda h, w: pg.linear_cross_entropy(h, w, probs(3, 5)),
            lambda h, w: F.cross_entropy(F.linear(h, w), probs(3, 5)), [(3, 8, f32), (5, 8, f32)]),
        "linear_token_log_probs": (
            lambda h, w: pg.linear_token_log_probs(h, w, t(3)),
            lambda h, w: torch.log_softmax(F.linear(h, w).float(), -1).gather(
                -1, t(3)[:, None])[:, 0], [(3, 8, f32), (5, 8, f32)]),
        "distillation kl": (
            lambda s: pg.distillation_loss(s, s.detach().flip(-1), reduction="sum"),
            lambda s: F.kl_div(torch.log_softmax(s.float(), -1),
                               torch.log_softmax(s.detach().flip(-1).float(), -1),
                               reduction="sum", log_target=True), [(3, 5, bf16)]),
        "linear distillation kl": (
            lambda h, w: pg.linear_distillation_loss(h, w, h.detach(), w.detach().flip(0),
                                                     reduction="sum"),
            lambda h, w: F.kl_div(torch.log_softmax(F.linear(h, w).float(), -1),
                                  torch.log_softmax(F.linear(h, w.flip(0)).detach().float(), -1),
                                  reduction="sum", log_target=True),
            [(3, 8, f32), (5, 8, f32)]),
    }


AUTOCAST = _autocast_cases()


@pytest.mark.parametrize("name", list(AUTOCAST))
def test_autocast_follows_torch(name, device, monkeypatch):
    """Under torch.autocast every op returns what torch's composition returns there, dtype
    first: cross-entropy and BCE a float32 loss (they once returned bf16), softmax float32 on
    CUDA only, sigmoid the input's dtype; the fused heads run their GEMMs in the autocast dtype
    (F.linear's policy; they ran the parameters' float32). Gradients have the inputs' dtypes."""
    from probact_gpu.ops import _common

    torch.manual_seed(0)
    ours_fn, ref_fn, specs = AUTOCAST[name]
    inputs = [torch.randn(s[:-1], dtype=s[-1]).to(device).requires_grad_() for s in specs]
    refs = [a.detach().clone().requires_grad_() for a in inputs]
    gemm_dtypes = []
    chunk_logits = _common.chunk_logits

    def spy(h, weight, bias, out):
        gemm_dtypes.append((h.dtype, weight.dtype))
        return chunk_logits(h, weight, bias, out)

    monkeypatch.setattr(_common, "chunk_logits", spy)
    monkeypatch.setattr("probact_gpu.ops.linear_cross_entropy.chunk_logits", spy)
    monkeypatch.setattr("probact_gpu.ops.linear_distillation.chunk_logits", spy)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours, ref = ours_fn(*inputs), ref_fn(*refs)
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours, ref, **tol)
    if name.startswith("linear"):
        assert gemm_dtypes and set(gemm_dtypes) == {(torch.bfloat16, torch.bfloat16)}
    ours.sum().backward()
    ref.sum().backward()
    for a, b in zip(inputs, refs, strict=True):
        assert a.grad.dtype == b.grad.dtype
        torch.testing.assert_close(a.grad, b.grad, **tol)

"""token_log_probs: per-token log-prob, entropy, lse and argmax of logits, and the gradient
through log-prob and entropy, against the NumPy float64 reference (probact_gpu.reference_lm_head).

The per-row outputs are fp32 (fp64 for fp64 logits) whatever the logits' dtype, so they are
held to the fp32 tolerance on every 16-bit input (both sides see the same rounded logits); the
gradient is in the logits' dtype and held to that dtype's tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probact_gpu import reference_lm_head as ref
from probact_gpu.ops.token_log_probs import (
    TokenLogProbs,
    token_log_probs,
    token_log_probs_bwd,
    token_log_probs_fwd,
)
from probact_gpu.options import HeadTransform
from probact_gpu.testing import (
    assert_close_to_reference,
    make_input,
    record_launches,
    to_numpy64,
)
from probact_gpu.tiling import RowConfig

IGNORE = -100
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _targets(rng, n_rows: int, n_cols: int, device, ignore: bool = True) -> torch.Tensor:
    t = rng.integers(0, n_cols, n_rows)
    if ignore and n_rows > 2:
        t[1] = IGNORE
    return torch.from_numpy(t).to(device)


def _check_all(x, x64, t, dtype, transform: HeadTransform, config, device, rng, path):
    """Every output and the gradient (both upstream grads) through the launchers with
    ``config``, against the reference; asserts ``path`` ran."""
    n = t.shape[0]
    g_logp = torch.from_numpy(rng.standard_normal(n)).to(device, _out_dtype(dtype))
    g_ent = torch.from_numpy(rng.standard_normal(n)).to(device, _out_dtype(dtype))
    expected = ref.token_log_probs(
        x64, to_numpy64(t), logit_scale=transform.logit_scale,
        logit_divisor=transform.logit_divisor, softcap=transform.softcap,
        temperature=transform.temperature, grad_logp=to_numpy64(g_logp),
        grad_entropy=to_numpy64(g_ent))
    with record_launches() as log:
        logp, entropy, lse, arg, stats = token_log_probs_fwd(
            x, t, transform=transform, compute_entropy=True, compute_argmax=True,
            save_stats=True, config=config)
        dx = token_log_probs_bwd(x, t, stats, g_logp, g_ent, transform=transform,
                                 config=config)
    assert {launch.path for launch in log} == {path}
    out = _out_dtype(dtype)
    assert logp.dtype == entropy.dtype == lse.dtype == out and arg.dtype == torch.int64
    assert_close_to_reference(logp, expected["logp"], out, "logp")
    assert_close_to_reference(entropy, expected["entropy"], out, "entropy")
    assert_close_to_reference(lse, expected["lse"], out, "lse")
    np.testing.assert_array_equal(arg.numpy() if arg.device.type == "cpu" else arg.cpu().numpy(),
                                  expected["argmax"])
    assert dx.dtype == dtype
    assert_close_to_reference(dx, expected["dx"], dtype, "dlogits")


# (shape, config, path, why)
PATH_CASES = [
    ((6, 7), None, "single", "odd V, several rows per program"),
    ((3, 1), None, "single", "one class: logp 0, entropy 0"),
    ((4, 129), RowConfig("multi", 32, 4), "multi", "multi tile, a 1-column last tile"),
    ((3, 4097), RowConfig("single", 8192, 8), "single", "one past a power of two, one tile"),
    ((2, 5003), RowConfig("multi", 1024, 4), "multi", "50257-ish scaled down, multi tile"),
    ((2, 5003), RowConfig("split", 512, 4, n_splits=4), "split",
     "50257-ish scaled down, split row"),
    ((2, 129), RowConfig("split", 16, 4, n_splits=12), "split",
     "split with chunks past the row's end (empty partials)"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,config,path,why", PATH_CASES,
                         ids=[c[3].split(",")[0] for c in PATH_CASES])
def test_token_log_probs_paths_match_reference(shape, config, path, why, dtype, device, rng):
    x, x64 = make_input(shape, dtype, rng, scale=2.0, device=device)
    t = _targets(rng, shape[0], shape[1], device)
    _check_all(x, x64, t, dtype, HeadTransform(), config, device, rng, path)


EDGE_ROWS = ["large_negative", "all_neg_inf_but_one", "pm_1e4", "neg_inf_entries"]


def _edge_input(kind: str, shape, rng) -> np.ndarray:
    x = rng.standard_normal(shape)
    if kind == "large_negative":  # a fused kernel starting its max at 0 gives logp > 0 here
        return x - 1e4
    if kind == "all_neg_inf_but_one":
        out = np.full(shape, -np.inf)
        out[np.arange(shape[0]), rng.integers(0, shape[1], shape[0])] = x[:, 0]
        return out
    if kind == "pm_1e4":
        return np.sign(x) * 1e4 + x
    out = x * 3.0
    out[rng.random(shape) < 0.3] = -np.inf
    return out


@pytest.mark.parametrize("config,path", [(None, "single"), (RowConfig("multi", 16, 4), "multi"),
                                         (RowConfig("split", 16, 4, n_splits=3), "split")],
                         ids=["single", "multi", "split"])
@pytest.mark.parametrize("kind", EDGE_ROWS)
def test_token_log_probs_edge_rows(kind, config, path, device, rng):
    shape = (5, 40)
    x64 = _edge_input(kind, shape, rng).astype(np.float32).astype(np.float64)
    x = torch.from_numpy(x64).float().to(device)
    t = torch.from_numpy(rng.integers(0, shape[1], shape[0])).to(device)
    if kind == "all_neg_inf_but_one":  # the target is the finite entry: logp 0, entropy 0
        t = torch.from_numpy(np.argmax(x64, axis=1)).to(device)
    _check_all(x, x64, t, torch.float32, HeadTransform(), config, device, rng, path)
    logp, *_ = token_log_probs_fwd(x, t, config=config)
    assert bool((logp <= 0).all())


TRANSFORMS = [
    ("temperature_0.1", HeadTransform(temperature=0.1)),
    ("temperature_10", HeadTransform(temperature=10.0)),
    ("softcap_temperature", HeadTransform(softcap=3.0, temperature=0.7)),
    ("all", HeadTransform(logit_scale=1.7, logit_divisor=2.5, softcap=4.0, temperature=1.3)),
    ("negative_scale", HeadTransform(logit_scale=-0.5)),
]


@pytest.mark.parametrize("config,path", [(None, "single"), (RowConfig("multi", 16, 4), "multi"),
                                         (RowConfig("split", 16, 4, n_splits=2), "split")],
                         ids=["single", "multi", "split"])
@pytest.mark.parametrize("name,transform", TRANSFORMS, ids=[n for n, _ in TRANSFORMS])
def test_token_log_probs_transforms(name, transform, config, path, device, rng):
    x, x64 = make_input((4, 37), torch.float32, rng, scale=4.0, device=device)
    t = _targets(rng, 4, 37, device)
    _check_all(x, x64, t, torch.float32, transform, config, device, rng, path)


# --------------------------------------------------------------------------- public function


def test_token_log_probs_public_btv_with_autograd(device, rng):
    """(B, T, V) bf16 logits with ignored positions and every transform: all four outputs, the
    gradient of Σ g·logp + Σ h·entropy, and ignored rows' gradient exactly 0."""
    x, x64 = make_input((2, 3, 50), torch.bfloat16, rng, scale=3.0, device=device)
    t = torch.from_numpy(rng.integers(0, 50, (2, 3))).to(device)
    t[0, 1] = t[1, 2] = IGNORE
    kw = dict(logit_scale=1.5, logit_divisor=1.2, softcap=6.0, temperature=0.8)
    g = rng.standard_normal((2, 3))
    h = rng.standard_normal((2, 3))
    expected = ref.token_log_probs(x64, to_numpy64(t), grad_logp=g, grad_entropy=h, **kw)
    xr = x.clone().requires_grad_()
    out = token_log_probs(xr, t, return_entropy=True, return_lse=True, return_argmax=True, **kw)
    assert isinstance(out, TokenLogProbs) and out.logprobs.shape == (2, 3)
    assert not out.lse.requires_grad and out.entropy.requires_grad
    for name, value in (("logp", out.logprobs), ("entropy", out.entropy), ("lse", out.lse)):
        assert_close_to_reference(value, expected[name], torch.float32, name)
    np.testing.assert_array_equal(out.argmax.cpu().numpy(), expected["argmax"])
    ((out.logprobs * torch.from_numpy(g).float().to(device)).sum()
     + (out.entropy * torch.from_numpy(h).float().to(device)).sum()).backward()
    assert_close_to_reference(xr.grad, expected["dx"], torch.bfloat16, "dlogits")
    assert bool((xr.grad[0, 1] == 0).all()) and bool((xr.grad[1, 2] == 0).all())
    assert float(out.logprobs[0, 1].detach()) == 0.0 == float(out.entropy[0, 1].detach())


def test_token_log_probs_entropy_gradient_alone(device, rng):
    """Upstream gradient on the entropy only (a chunked entropy whose gradient was silently
    zero is a known peer bug): the logp branch is not launched, and dx matches −p·(z − Σp·z)."""
    x, x64 = make_input((5, 33), torch.float32, rng, scale=2.0, device=device)
    t = _targets(rng, 5, 33, device)
    h = rng.standard_normal(5)
    expected = ref.token_log_probs(x64, to_numpy64(t), temperature=0.9, grad_entropy=h)
    xr = x.clone().requires_grad_()
    out = token_log_probs(xr, t, temperature=0.9, return_entropy=True)
    with record_launches() as log:
        (out.entropy * torch.from_numpy(h).float().to(device)).sum().backward()
    (bwd,) = log
    assert bwd.meta["HAS_GRAD_ENTROPY"] and not bwd.meta["HAS_GRAD_LOGP"]
    assert float(xr.grad.abs().max()) > 1e-3
    assert_close_to_reference(xr.grad, expected["dx"], torch.float32, "dlogits")


def test_token_log_probs_logp_gradient_alone(device, rng):
    x, x64 = make_input((4, 20), torch.float32, rng, device=device)
    t = _targets(rng, 4, 20, device)
    expected = ref.token_log_probs(x64, to_numpy64(t), grad_logp=np.ones(4))
    xr = x.clone().requires_grad_()
    out = token_log_probs(xr, t, return_entropy=True)  # entropy computed, unused
    with record_launches() as log:
        out.logprobs.sum().backward()
    assert log[0].meta["HAS_GRAD_LOGP"] and not log[0].meta["HAS_GRAD_ENTROPY"]
    assert_close_to_reference(xr.grad, expected["dx"], torch.float32, "dlogits")


def test_token_log_probs_gradcheck_fp64(device, rng):
    x = torch.from_numpy(rng.standard_normal((3, 6)) * 2).to(device).requires_grad_()
    t = torch.tensor([4, IGNORE, 0], device=device)

    def f(x):
        out = token_log_probs(x, t, softcap=3.0, temperature=0.5, logit_scale=1.5,
                              return_entropy=True)
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_token_log_probs_forward_only_saves_nothing(device, rng):
    x, _ = make_input((4, 30), torch.float32, rng, device=device)
    t = _targets(rng, 4, 30, device)
    xr = x.clone().requires_grad_()
    with torch.no_grad(), record_launches() as log:
        logp = token_log_probs(xr, t)
    assert not logp.requires_grad
    assert [launch.meta["SAVE_STATS"] for launch in log] == [False]
    assert not log[0].meta["COMPUTE_ENTROPY"] and not log[0].meta["COMPUTE_ARGMAX"]
    with record_launches() as log:
        logp_grad = token_log_probs(xr, t)
    assert [launch.meta["SAVE_STATS"] for launch in log] == [True]
    torch.testing.assert_close(logp, logp_grad.detach(), rtol=0, atol=0)


def test_token_log_probs_return_types(device, rng):
    x, _ = make_input((2, 3, 9), torch.float32, rng, device=device)
    t = torch.zeros((2, 3), dtype=torch.int32, device=device)
    logp = token_log_probs(x, t)
    assert isinstance(logp, torch.Tensor) and logp.shape == (2, 3)
    out = token_log_probs(x, t, return_lse=True)
    assert out.entropy is None and out.argmax is None and out.lse.shape == (2, 3)
    x1 = x[0, 0]  # (V,) logits, 0-d target
    single = token_log_probs(x1, torch.tensor(3, device=device), return_argmax=True)
    assert single.logprobs.shape == () and single.argmax.shape == ()


def test_token_log_probs_strided_logits_no_copy(device, rng):
    """A transposed and a sliced view: the kernel reads them in place (the launch's strides are
    the view's), and the result equals the contiguous one."""
    base, _ = make_input((40, 6), torch.float32, rng, device=device)
    x = base.t()  # (6, 40), column stride 6
    t = _targets(rng, 6, 40, device)
    with record_launches() as log:
        out = token_log_probs(x, t, return_entropy=True)
    assert len(log) == 1
    contiguous = token_log_probs(x.contiguous(), t, return_entropy=True)
    torch.testing.assert_close(out.logprobs, contiguous.logprobs)
    torch.testing.assert_close(out.entropy, contiguous.entropy)
    wide, _ = make_input((6, 64), torch.float32, rng, device=device)
    sliced = wide[:, 3:43]
    torch.testing.assert_close(token_log_probs(sliced, t),
                               token_log_probs(sliced.contiguous(), t))


def test_token_log_probs_out_of_range_target_is_nan(device, rng):
    x, _ = make_input((3, 8), torch.float32, rng, device=device)
    logp = token_log_probs(x, torch.tensor([1, 8, -1], device=device))
    assert not bool(logp[0].isnan()) and bool(logp[1:].isnan().all())


def test_token_log_probs_double_backward_raises(device, rng):
    x, _ = make_input((2, 5), torch.float32, rng, device=device)
    xr = x.clone().requires_grad_()
    logp = token_log_probs(xr, torch.tensor([0, 1], device=device))
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(logp.sum(), xr, create_graph=True)


def test_token_log_probs_op_without_saved_stats_backward(device, rng):
    """The registered op called with save_stats=False on logits that require grad (as opcheck
    does): the backward recomputes the statistics instead of reading an empty tensor."""
    x, _ = make_input((5, 9), torch.float32, rng, device=device)
    t = torch.tensor([0, 8, -100, 3, 3], device=device)
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    outs = torch.ops.probact_gpu.token_log_probs(xr, t, -100, 1.0, 1.0, 4.0, 0.7, True, False,
                                                 False)
    assert outs[-1].shape == (0,)
    (outs[0].sum() + outs[1].sum()).backward()
    out = token_log_probs(xs, t, softcap=4.0, temperature=0.7, return_entropy=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    torch.testing.assert_close(xr.grad, xs.grad)


def test_token_log_probs_bwd_rejects_stats_of_another_shape(device, rng):
    x, _ = make_input((4, 6), torch.float32, rng, device=device)
    t = torch.zeros(4, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="stats must be"):
        token_log_probs_bwd(x, t, x.new_empty(0), torch.ones(4, device=device), None)


def test_token_log_probs_compile_fullgraph(device, rng):
    torch._dynamo.reset()
    x, _ = make_input((4, 11), torch.float32, rng, device=device)
    t = _targets(rng, 4, 11, device)

    def f(x):
        out = token_log_probs(x, t, temperature=0.7, return_entropy=True)
        return (out.logprobs * 2).sum() + out.entropy.sum()

    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(xa)
    out.backward()
    f(xb).backward()
    torch.testing.assert_close(out, f(xb.detach()))
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(target=torch.zeros(3, dtype=torch.int64)), ValueError, "target must have shape"),
    (dict(target=torch.zeros(2, dtype=torch.float32)), TypeError, "int32 or int64"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(logit_divisor=0.0), ValueError, "logit_divisor"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(logits=torch.zeros(2, 0)), ValueError, "at least one class"),
    (dict(logits=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "logits"),
])
def test_token_log_probs_rejects_bad_arguments(kwargs, error, match, device):
    args = dict(logits=torch.zeros(2, 4), target=torch.zeros(2, dtype=torch.int64))
    args.update(kwargs)
    logits, target = args.pop("logits").to(device), args.pop("target").to(device)
    with pytest.raises(error, match=match):
        token_log_probs(logits, target, **args)


@pytest.mark.gpu
def test_token_log_probs_large_vocab_gpu(device):
    rng = np.random.default_rng(0)
    x, x64 = make_input((64, 128256), torch.bfloat16, rng, scale=2.0, device=device)
    t = _targets(rng, 64, 128256, device)
    expected = ref.token_log_probs(x64, to_numpy64(t), grad_logp=np.ones(64),
                                   grad_entropy=np.ones(64))
    xr = x.clone().requires_grad_()
    out = token_log_probs(xr, t, return_entropy=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert_close_to_reference(out.logprobs, expected["logp"], torch.float32, "logp")
    assert_close_to_reference(out.entropy, expected["entropy"], torch.float32, "entropy")
    assert_close_to_reference(xr.grad, expected["dx"], torch.bfloat16, "dlogits")


def test_token_log_probs_check_cases_pass(device, rng):
    """``probact-gpu check``'s token_log_probs cases: a single-tile and a split shape, every
    row passes (ours against float64; torch's unfused error reported beside)."""
    from probact_gpu.check import token_log_probs as check_module

    chosen = [c for c in check_module.cases(False)
              if c.dtype == torch.bfloat16 and c.shape in ("9x7", "3x9000")
              and c.op == "token_log_probs softcap+temperature+scale"]
    assert len(chosen) == 2
    rows = [row for case in chosen for row in case.run(device, rng)]
    assert len(rows) == 8 and all(row.passed for row in rows), [r.ours.detail for r in rows]
    assert all(row.torch_err is not None for row in rows)


def test_token_log_probs_ops_pass_opcheck(device, rng):
    """torch.library.opcheck: schema, fake implementations, autograd registration, and AOT
    dispatch with dynamic shapes, for the forward (with and without its optional outputs) and
    the backward (one upstream gradient absent)."""
    from probact_gpu.ops import token_log_probs as ops

    x = torch.from_numpy(rng.standard_normal((4, 9))).float().to(device).requires_grad_()
    t = torch.tensor([1, IGNORE, 8, 0], device=device)
    for args in ((x, t, IGNORE, 1.0, 1.0, None, 1.0, True, True, True),
                 (x.detach(), t, IGNORE, 1.5, 0.5, 3.0, 0.7, False, False, False)):
        torch.library.opcheck(ops._tlp_op, args)
    x64 = x.detach().double()
    *_, stats = ops._tlp_op(x64, t, IGNORE, 1.0, 1.0, None, 1.0, True, False, True)
    g = torch.ones(4, dtype=torch.float64, device=device)
    torch.library.opcheck(ops._tlp_bwd_op,
                          (x64, t, stats, g, None, IGNORE, 1.0, 1.0, None, 1.0))


def test_token_log_probs_no_rows(device):
    x = torch.zeros((0, 5), device=device, requires_grad=True)
    out = token_log_probs(x, torch.zeros(0, dtype=torch.int64, device=device),
                          return_entropy=True, return_argmax=True)
    assert out.logprobs.shape == out.entropy.shape == out.argmax.shape == (0,)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert x.grad.shape == (0, 5)


def test_token_log_probs_entropy_of_a_dominant_logit_is_accurate(device):
    """One logit ahead by ~80: the entropy is Σ p·|z − m| over p ~ e^−80 (~1e-33, still a
    normal fp32), so it is only as good as those tiny exponentials. exp2(x · log2 e) alone is
    ~|x| · 6e-8 relative off there (5e-6 at x = −80; the check's 4×257 row at ±1e4 logits was
    20× torch's error); ``exp_precise`` recovers the product's rounding with an fma."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(1), -torch.empty(30).uniform_(78.0, 90.0, generator=gen)])
    x = x.reshape(1, -1).to(device)
    target = torch.tensor([0], device=device)
    out = token_log_probs(x, target, return_entropy=True)
    expected = ref.token_log_probs(to_numpy64(x), target.cpu().numpy())["entropy"]
    rel = abs(float(out.entropy[0]) - float(expected[0])) / float(expected[0])
    assert rel < 5e-7, rel


# --------------------------------------------------------------------------- the head transform
# One class: lse = z exactly (shift = z, log 1 = 0), so a one-column row reads the kernels'
# transformed logit back.

_SCALE = dict(logit_scale=1.5, logit_divisor=3.0, temperature=0.7)  # z = x · 0.5 / 0.7


def _one_class_z(x: torch.Tensor, op: str, **kw) -> torch.Tensor:
    t = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    if op == "token_log_probs":
        return token_log_probs(x, t, return_lse=True, **kw).lse
    import probact_gpu

    return probact_gpu.cross_entropy(x, t, reduction="none", return_lse=True, **kw)[1]


def _ulps32(got: torch.Tensor, exact: np.ndarray) -> np.ndarray:
    """(got − exact) in ulps of fp32 at the exact value."""
    return (got.cpu().double().numpy() - exact) / np.spacing(np.abs(exact).astype(np.float32))


@pytest.mark.parametrize("op", ["token_log_probs", "cross_entropy"])
def test_head_scale_is_correctly_rounded(op, device, rng):
    """x · (logit_scale / logit_divisor / temperature) rounds once, to nearest, from the fp64
    factor: fma(x, hi, x · lo) (kernels/_head.py). x · fp32(factor) would be off by one ulp in a
    few percent of the elements, all with the factor's rounding's sign."""
    x, x64 = make_input((4096, 1), torch.float32, rng, scale=3.0, device=device)
    z = _one_class_z(x, op, **_SCALE)
    exact = x64[:, 0] * (1.5 / 3.0 / 0.7)
    np.testing.assert_array_equal(z.cpu().numpy(), exact.astype(np.float32))
    plain = (x.double().cpu().numpy()[:, 0] * np.float32(1.5 / 3.0 / 0.7)).astype(np.float32)
    assert (plain != exact.astype(np.float32)).mean() > 0.01  # what the split avoids


@pytest.mark.parametrize("op", ["token_log_probs", "cross_entropy"])
@pytest.mark.parametrize("softcap", [30.0, 4.0])
def test_head_softcap_within_one_ulp_unbiased(op, softcap, device, rng):
    """softcap · tanh(x · pre / softcap) / temperature against float64, no bias (mean error ≪ an
    ulp): within one ulp near 0 (|u| < 0.5: x · scale · (1 + u²P), one fma), within two where
    tanh saturates (the quotient's remainder and u's rounding carried; exp's own error remains:
    2.0 ulps measured at |u| ≈ 0.5 over 2e5 draws). torch's fp32 transform measured 1.47 ulps in
    both regions."""
    x, x64 = make_input((4096, 1), torch.float32, rng, scale=3.0 * softcap / 4.0,
                        device=device)
    z = _one_class_z(x, op, softcap=softcap, **_SCALE)
    exact = softcap * np.tanh(x64[:, 0] * 0.5 / softcap) / 0.7
    err = _ulps32(z, exact)
    near = np.abs(x64[:, 0] * 0.5 / softcap) < 0.5
    assert near.any() and (~near).any()
    assert np.abs(err[near]).max() <= 1.0, np.abs(err[near]).max()
    assert np.abs(err).max() <= 2.0, np.abs(err).max()
    assert abs(err.mean()) < 0.05, err.mean()


@pytest.mark.parametrize("config,path", [(None, "single"), (RowConfig("multi", 16, 4), "multi"),
                                         (RowConfig("split", 16, 4, n_splits=2), "split")],
                         ids=["single", "multi", "split"])
@pytest.mark.parametrize("name,transform", TRANSFORMS, ids=[n for n, _ in TRANSFORMS])
def test_token_log_probs_transforms_fp64(name, transform, config, path, device, rng):
    """The transform's fp64 forms (exact factors: plain products, the softcap's plain tanh) on
    every path, to fp64's tolerance."""
    x, x64 = make_input((4, 37), torch.float64, rng, scale=4.0, device=device)
    t = _targets(rng, 4, 37, device)
    _check_all(x, x64, t, torch.float64, transform, config, device, rng, path)


@pytest.mark.parametrize("temperature", [0.7, 1.3, 3.0])  # factor remainders of both signs
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("op", ["token_log_probs", "cross_entropy"])
def test_head_transform_of_infinite_logits(op, softcap, temperature, device):
    """±inf and NaN logits through the split products (``mul_factor``: ``fma(x, hi, x·lo)``
    would meet inf − inf where lo's sign differs from hi's) and the softcap (tanh(±inf) = ±1):
    NaN and ±inf where torch's transform + log_softmax in float64 put them, the rest close."""
    import probact_gpu

    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[0.5, -inf, 2.0, 1.0], [inf, 0.0, 1.0, -1.0], [-inf] * 4,
                      [0.5, nan, 1.0, 2.0], [1e30, -1e30, 0.0, 3.0]], device=device)
    t = torch.tensor([0, 2, 1, 3, 3], device=device)
    kw = dict(logit_scale=1.5, softcap=softcap, temperature=temperature)
    z = HeadTransform(**kw).apply(x.double().cpu())
    expected = torch.log_softmax(z, -1).gather(1, t.cpu()[:, None])[:, 0]
    if op == "token_log_probs":
        got = token_log_probs(x, t, **kw).double().cpu()
    else:
        got = -probact_gpu.cross_entropy(x, t, reduction="none", **kw).double().cpu()
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-5,
                               equal_nan=True)


@pytest.mark.parametrize(("kw", "mode", "factors"), [
    (dict(), 0, (1.0, 1.0, 1.0)),
    (dict(logit_scale=2.0, temperature=2.0), 0, (1.0, 1.0, 1.0)),  # z = x: no arithmetic
    (dict(temperature=0.5), 1, (2.0, 1.0, 1.0)),
    (dict(logit_scale=1.5, logit_divisor=3.0, softcap=4.0, temperature=0.8), 2,
     (0.5 / 0.8, 0.5 / 4.0, 4.0 / 0.8)),
])
def test_head_kernel_mode_and_factors(kw, mode, factors, device):
    """HeadTransform → the kernels' HEAD constexpr and fp64 factors, as launched."""
    transform = HeadTransform(**kw)
    assert transform.kernel_mode == mode and transform.kernel_factors == factors
    x = torch.zeros((2, 5), device=device)
    with record_launches() as launches:
        token_log_probs(x, torch.zeros(2, dtype=torch.int64, device=device), **kw)
    assert {rec.meta["HEAD"] for rec in launches} == {mode}


# --------------------------------------------------------------------------- NaN and +inf rows

NAN, INF = float("nan"), float("inf")


def _special_rows(v: int = 40) -> torch.Tensor:
    """Rows whose argmax / lse torch defines through a NaN or +inf: a NaN before the max (in an
    earlier tile), after it (in a later tile, past a larger value), two NaNs, all NaN, a NaN
    among −inf, +inf alone, +inf twice, +inf with a NaN, +inf among −inf, and a plain row."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, v, generator=g)
    x[0, 1], x[0, 30] = NAN, 50.0
    x[1, 35], x[1, 2] = NAN, 50.0
    x[2, 3], x[2, 20] = NAN, NAN
    x[3] = NAN
    x[4], x[4, 17] = -INF, NAN
    x[5, 21] = INF
    x[6, 5], x[6, 33] = INF, INF
    x[7, 2], x[7, 36] = INF, NAN
    x[8], x[8, 25] = -INF, INF
    return x


SPECIAL_PATHS = [(None, "single"), (RowConfig("multi", 16, 4), "multi"),
                 (RowConfig("split", 16, 4, n_splits=3), "split")]


@pytest.mark.parametrize("config,path", SPECIAL_PATHS, ids=["single", "multi", "split"])
def test_token_log_probs_argmax_and_lse_of_nan_and_inf_rows_are_torchs(config, path, device):
    """argmax is torch.argmax's (a NaN is the max: the first NaN's index; it was the largest
    non-NaN's) and lse is torch.logsumexp's (+inf for a +inf logit without a NaN; it was NaN),
    on every path; logp and entropy are NaN on those rows, as log_softmax gives."""
    x = _special_rows().to(device)
    t = torch.tensor([0, 1, 2, 3, 4, 5, 5, 2, 25, 9], device=device)
    with record_launches() as log:
        logp, entropy, lse, arg, _ = token_log_probs_fwd(x, t, compute_entropy=True,
                                                         compute_argmax=True, config=config)
    assert {launch.path for launch in log} == {path}
    torch.testing.assert_close(arg, torch.argmax(x, dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(lse, torch.logsumexp(x.double(), -1).float(), equal_nan=True)
    want_logp = torch.log_softmax(x.double(), -1).gather(1, t[:, None])[:, 0]
    assert torch.equal(torch.isnan(logp), torch.isnan(want_logp))
    assert torch.isnan(entropy[:8]).all() and not torch.isnan(entropy[9])

"""The batch-invariant contract (docs/rl.md), bit for bit (``torch.equal``): every per-token
output of ``token_log_probs``, ``linear_token_log_probs``, ``cross_entropy`` and
``linear_cross_entropy`` with ``batch_invariant=True`` is the same whatever the other rows,
their number and the row's place (batch); dh, dW, db are the same for any ``chunk_size`` /
``memory_budget`` (chunk); two runs give the same bits (run-to-run); the vocab-parallel forms
give the single device's bits at 2 and 4 ranks (TP, gloo ranks: tests/_gloo.py).

Sizes: 300 classes (two whole 128-class tiles and a partial one), hidden 40, 70 tokens for the
fused head (two 64-token tiles, so a token changes tile when the batch is cut), bf16 and fp32.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from probact_gpu import reference_lm_head as ref
from probact_gpu.distributed import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_linear_token_log_probs,
    vocab_parallel_token_log_probs,
)
from probact_gpu.ops.cross_entropy import cross_entropy
from probact_gpu.ops.linear_cross_entropy import linear_cross_entropy
from probact_gpu.ops.linear_token_log_probs import linear_token_log_probs
from probact_gpu.ops.token_log_probs import token_log_probs
from probact_gpu.testing import assert_close_to_reference, record_launches, to_numpy64

IGNORE = -100
VOCAB, HIDDEN = 300, 40
SPAWN_TIMEOUT_S = 300


def _tensor(rng, shape, dtype, scale=1.0):
    return torch.from_numpy(rng.standard_normal(shape) * scale).to(dtype)


def _logits_case(seed, dtype, n=37, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    x = _tensor(rng, (n, vocab), dtype, 4.0)
    t = torch.from_numpy(rng.integers(0, vocab, n))
    t[::5] = IGNORE
    return x, t, torch.from_numpy(rng.standard_normal(n)).float(), \
        torch.from_numpy(rng.standard_normal(n)).float()


def _head_case(seed, dtype, n=70, vocab=VOCAB, hidden=HIDDEN):
    rng = np.random.default_rng(seed)
    h = _tensor(rng, (n, hidden), dtype)
    w = _tensor(rng, (vocab, hidden), dtype, 4.0 / np.sqrt(hidden))
    b = _tensor(rng, (vocab,), dtype)
    t = torch.from_numpy(rng.integers(0, vocab, n))
    t[::4] = IGNORE
    return h, w, b, t


def _tlp(x, t, g, gh, **kw):
    xr = x.clone().requires_grad_()
    out = token_log_probs(xr, t, return_entropy=True, return_lse=True, return_argmax=True,
                          batch_invariant=True, temperature=0.8, **kw)
    ((out.logprobs * g).sum() + (out.entropy * gh).sum()).backward()
    return {"logp": out.logprobs, "entropy": out.entropy, "lse": out.lse,
            "argmax": out.argmax, "dx": xr.grad}


def _fused_tlp(h, w, b, t, g, **kw):
    hr, wr, br = (a.clone().requires_grad_() for a in (h, w, b))
    out = linear_token_log_probs(hr, wr, t, linear_bias=br, return_entropy=True,
                                 batch_invariant=True, softcap=6.0, **kw)
    ((out.logprobs * g).sum() + out.entropy.sum()).backward()
    return {"logp": out.logprobs, "entropy": out.entropy, "dh": hr.grad, "dw": wr.grad,
            "db": br.grad}


def _assert_equal(a: dict, b: dict, rows=None, names=None):
    for name in names or a:
        x, y = a[name], b[name]
        if rows is not None and name not in ("dw", "db"):
            x = x[rows]
        assert torch.equal(x, y), f"{name} differs"


# --------------------------------------------------------------------------- single device


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_token_log_probs_batch_invariant(dtype):
    """A row's outputs and gradient row alone, among others, permuted beside rows of 1e4: the
    same bits (the second call recomputes every row: run to run too); and the values are
    float64's to fp32 rounding."""
    x, t, g, gh = _logits_case(1, dtype)
    full = _tlp(x, t, g, gh)
    expected = ref.token_log_probs(to_numpy64(x), to_numpy64(t), temperature=0.8)
    assert_close_to_reference(full["logp"], expected["logp"], torch.float32, "logp")
    rows = [3, 17, 30]
    _assert_equal(full, _tlp(x[rows], t[rows], g[rows], gh[rows]), rows)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(0))
    loud = torch.full((5, VOCAB), 1e4, dtype=dtype)
    mixed = _tlp(torch.cat([x[perm], loud]), torch.cat([t[perm], t[:5]]),
                 torch.cat([g[perm], g[:5]]), torch.cat([gh[perm], gh[:5]]))
    _assert_equal(full, {k: v[:37] for k, v in mixed.items()}, perm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_token_log_probs_batch_chunk_invariant(dtype):
    """The fused head: tokens alone or among 70 (a token moves from the second 64-token tile
    to the first) — per-token outputs and dh rows the same bits; bf16: the chunkings too
    (forward token chunks of 64; backward vocabulary chunks of one 128-class tile through a
    budget) — every output and dh, dW, db the same bits as one chunk's, on a second run."""
    h, w, b, t = _head_case(2, dtype)
    g = torch.linspace(-1.0, 1.0, 70)
    full = _fused_tlp(h, w, b, t, g)
    rows = [1, 66, 69]
    part = _fused_tlp(h[rows], w, b, t[rows], g[rows])
    _assert_equal(full, part, rows, ("logp", "entropy", "dh"))
    if dtype != torch.bfloat16:
        return
    budget = 70 * 128 * h.element_size()  # one tile of classes a backward chunk: 3 chunks
    with record_launches() as log:
        chunked = _fused_tlp(h, w, b, t, g, chunk_size=64, memory_budget=budget)
    assert sum(launch.kernel == "head_gemm_bwd_dh_kernel" for launch in log) == 3
    assert sum(launch.kernel == "head_gemm_fwd_kernel" for launch in log) == 2
    _assert_equal(full, chunked)


def test_cross_entropy_batch_invariant_and_extras():
    """Class weights, z-loss, reduction none: loss rows, lse, z-loss term and predicted tokens
    of a row alone and among others, the same bits; the reduced loss and the extras match
    torch's."""
    x, t, _, _ = _logits_case(3, torch.float32)
    w = torch.rand(VOCAB, generator=torch.Generator().manual_seed(1)) + 0.5
    kw = dict(weight=w, z_loss=1e-3, batch_invariant=True, return_lse=True, return_z_loss=True,
              return_predicted_tokens=True)
    full = cross_entropy(x, t, reduction="none", **kw)
    rows = [0, 4, 11, 36]
    part = cross_entropy(x[rows], t[rows], reduction="none", **kw)
    for a, b in zip(full, part, strict=True):
        if a is not None:
            assert torch.equal(a[rows], b)
    xr = x.double()
    lse = torch.logsumexp(xr, 1)
    keep = t != IGNORE
    torch_rows = torch.nn.functional.cross_entropy(xr, t, weight=w.double(), reduction="none")
    torch.testing.assert_close(full.loss.double(), torch_rows + 1e-3 * lse**2 * keep)
    assert torch.equal(full.predicted_tokens, x.argmax(1))
    mean = cross_entropy(x, t, reduction="mean", return_token_accuracy=True, **{
        k: v for k, v in kw.items() if k not in ("return_predicted_tokens",)})
    acc = (x.argmax(1) == t)[keep].double().mean()
    torch.testing.assert_close(mean.token_accuracy.double(), acc)
    # the z term of a weighted mean is averaged over the kept tokens, as the default path's
    torch.testing.assert_close(mean.z_loss.double(), (1e-3 * lse**2)[keep].sum() / keep.sum())
    torch.testing.assert_close(mean.loss.double(), torch.nn.functional.cross_entropy(
        xr, t, weight=w.double()) + (1e-3 * lse**2)[keep].sum() / keep.sum())


def test_linear_cross_entropy_batch_chunk_invariant():
    """The fused head's cross-entropy (reduction none, bf16): loss rows of tokens alone and in
    the batch the same bits; dW, db for two vocabulary chunkings the same bits."""
    h, w, b, t = _head_case(4, torch.bfloat16)

    def run(hh, tt, **kw):
        hr, wr, br = (a.clone().requires_grad_() for a in (hh, w, b))
        out = linear_cross_entropy(hr, wr, tt, linear_bias=br, reduction="none", z_loss=1e-4,
                                   batch_invariant=True, return_z_loss=True, **kw)
        out.loss.float().sum().backward()
        return out, hr.grad, wr.grad, br.grad

    full, dh, dw, db = run(h, t)
    rows = [2, 65]
    part, dh_part, _, _ = run(h[rows], t[rows])
    assert torch.equal(full.loss[rows], part.loss) and torch.equal(dh[rows], dh_part)
    _, dh2, dw2, db2 = run(h, t, memory_budget=70 * 128 * 2)
    assert torch.equal(dh, dh2) and torch.equal(dw, dw2) and torch.equal(db, db2)
    h64, w64, b64 = (to_numpy64(a) for a in (h, w, b))
    expected = ref.token_log_probs(h64 @ w64.T + b64, to_numpy64(t))
    lse = expected["lse"]
    rows_ref = np.where(to_numpy64(t) != IGNORE, -expected["logp"] + 1e-4 * lse**2, 0.0)
    # the loss comes back in the input's dtype, as torch's: one bf16 rounding of fp32 rows
    assert_close_to_reference(full.loss, rows_ref, torch.bfloat16, "loss rows")


def test_cross_entropy_extras_default_path_and_modules():
    """The extra outputs without batch_invariant (the argmax from one more read of the logits,
    the z-loss term from lse) equal the invariant path's to fp32 rounding and torch's argmax;
    the modules pass the options on."""
    x, t, _, _ = _logits_case(7, torch.float32, n=12, vocab=50)
    kw = dict(reduction="sum", z_loss=1e-2, return_z_loss=True, return_token_accuracy=True,
              return_predicted_tokens=True)
    default = cross_entropy(x, t, **kw)
    invariant = cross_entropy(x, t, batch_invariant=True, **kw)
    assert torch.equal(default.predicted_tokens, x.argmax(1))
    assert torch.equal(default.predicted_tokens, invariant.predicted_tokens)
    torch.testing.assert_close(default.z_loss, invariant.z_loss)
    torch.testing.assert_close(default.loss, invariant.loss)
    assert torch.equal(default.token_accuracy, invariant.token_accuracy)
    import probact_gpu as pg

    module = pg.CrossEntropyLoss(reduction="none", batch_invariant=True,
                                 return_predicted_tokens=True)
    assert torch.equal(module(x, t).loss, cross_entropy(x, t, reduction="none",
                                                        batch_invariant=True))
    h, w, b, t = _head_case(8, torch.float32, n=9, vocab=60)
    lin = pg.LinearCrossEntropyLoss(batch_invariant=True, return_z_loss=True, z_loss=1e-3)
    out = lin(h, w, t, b)
    ref = linear_cross_entropy(h, w, t, linear_bias=b, z_loss=1e-3, return_z_loss=True,
                               return_predicted_tokens=True)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.z_loss, ref.z_loss)
    expected = (h @ w.T + b).argmax(1)
    assert torch.equal(ref.predicted_tokens, expected)


@pytest.mark.parametrize("invariant", [False, True])
def test_token_log_probs_index_k(invariant):
    """A (…, K) index: the log-probs of K tokens a row (an ignored entry, a repeated one), the
    row's entropy; gradients against float64; K = 1 gives the plain op's values."""
    rng = np.random.default_rng(5)
    x = _tensor(rng, (2, 3, 50), torch.float32, 3.0)
    idx = torch.from_numpy(rng.integers(0, 50, (2, 3, 4)))
    idx[0, 1, 2] = IGNORE
    idx[1, 2, 3] = idx[1, 2, 0]
    idx[1, 0, :] = IGNORE  # a row with nothing to score: entropy 0, no gradient
    xr = x.clone().requires_grad_()
    out = token_log_probs(xr, idx, return_entropy=True, batch_invariant=invariant,
                          softcap=7.0)
    assert out.logprobs.shape == (2, 3, 4) and out.entropy.shape == (2, 3)
    g = torch.from_numpy(rng.standard_normal((2, 3, 4))).float()
    gh = torch.from_numpy(rng.standard_normal((2, 3))).float()
    ((out.logprobs * g).sum() + (out.entropy * gh).sum()).backward()
    x64, i64 = to_numpy64(x), to_numpy64(idx).astype(np.int64)
    dx = np.zeros_like(x64)
    for k in range(4):
        r = ref.token_log_probs(x64, i64[..., k], softcap=7.0, grad_logp=to_numpy64(g)[..., k])
        assert_close_to_reference(out.logprobs[..., k], r["logp"], torch.float32, f"logp {k}")
        dx += r["dx"]
    row_valid = (i64 != IGNORE).any(-1)
    rh = ref.token_log_probs(x64, np.where(row_valid, i64[..., 0], 0), softcap=7.0,
                             grad_entropy=to_numpy64(gh) * row_valid)
    dx += rh["dx"]
    assert_close_to_reference(out.entropy, rh["entropy"] * row_valid, torch.float32, "entropy")
    assert_close_to_reference(xr.grad, dx, torch.float32, "dx")
    one = token_log_probs(x, idx[..., :1], batch_invariant=invariant, softcap=7.0)
    plain = token_log_probs(x, idx[..., 0], batch_invariant=invariant, softcap=7.0)
    torch.testing.assert_close(one[..., 0], plain, rtol=0, atol=0 if invariant else 1e-6)


def test_batch_invariant_bad_arguments():
    x, t, _, _ = _logits_case(6, torch.float32, n=4)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(x, t, label_smoothing=0.1, batch_invariant=True)
    with pytest.raises(ValueError, match="class-index"):
        cross_entropy(x, torch.softmax(x, 1), batch_invariant=True)
    h, w, b, t = _head_case(6, torch.float32, n=4)
    with pytest.raises(ValueError, match="fp32_precision"):
        linear_token_log_probs(h, w, t, fp32_precision="tf32", batch_invariant=True)
    with pytest.raises(ValueError, match="batch_invariant=True"):
        linear_token_log_probs(h, w, t, fp32_precision="bf16x3")


# --------------------------------------------------------------------------- tensor parallel

# (start, size) per rank: uneven shards on 128-class boundaries, the last one partial; and
# for the error case one boundary off the tile.
TP_LAYOUTS = {2: ((0, 128), (128, 172)), 4: ((0, 128), (128, 0), (128, 128), (256, 44))}
TP_BAD = {2: ((0, 100), (100, 200))}


def _tp_cases(world):
    """(name, dtype) of the cases a group size runs: every form at 2 ranks, the fused head and
    the logits form at 4 (the interpreter on two cores: one spawn, kept short)."""
    if world == 2:
        return [("tlp", torch.float32), ("ltlp", torch.bfloat16), ("ce", torch.float32),
                ("lce", torch.bfloat16)]
    return [("tlp", torch.bfloat16), ("ltlp", torch.float32)]


def _tp_inputs(form, dtype):
    seed = zlib.crc32(f"{form}{dtype}".encode())
    if form in ("tlp", "ce"):
        x, t, g, gh = _logits_case(seed, dtype, n=9)
        return x, t, g, gh
    h, w, b, t = _head_case(seed, dtype, n=9)
    return h, w, b, t


def _run_form(form, dtype, layout=None, rank=0, group=None):
    """One form on one device (``layout`` None) or on this rank's shard of ``group``: outputs
    and gradients (this shard's columns / rows)."""
    kw = {} if layout is None else dict(vocab_start_index=layout[rank][0], vocab_size=VOCAB,
                                        group=group)
    lo, hi = (0, VOCAB) if layout is None else (layout[rank][0], sum(layout[rank]))
    if form in ("tlp", "ce"):
        x, t, g, gh = _tp_inputs(form, dtype)
        xr = x[:, lo:hi].clone().requires_grad_()
        if form == "tlp":
            fn = token_log_probs if layout is None else vocab_parallel_token_log_probs
            out = fn(xr, t, return_entropy=True, return_lse=True, return_argmax=True,
                     batch_invariant=True, logit_scale=1.2, **kw)
            ((out.logprobs * g).sum() + (out.entropy * gh).sum()).backward()
            res = {"logp": out.logprobs, "entropy": out.entropy, "lse": out.lse,
                   "argmax": out.argmax}
        else:
            fn = cross_entropy if layout is None else vocab_parallel_cross_entropy
            loss = fn(xr, t, reduction="none", z_loss=1e-3, batch_invariant=True, **kw)
            (loss * g).sum().backward()
            res = {"loss": loss}
        return {**res, "grad": xr.grad}
    h, w, b, t = _tp_inputs(form, dtype)
    hr = h.clone().requires_grad_()
    wr, br = w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
    if form == "ltlp":
        fn = linear_token_log_probs if layout is None else vocab_parallel_linear_token_log_probs
        out = fn(hr, wr, t, linear_bias=br, return_entropy=True, batch_invariant=True,
                 temperature=0.9, **kw)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        res = {"logp": out.logprobs, "entropy": out.entropy}
    else:
        fn = linear_cross_entropy if layout is None else vocab_parallel_linear_cross_entropy
        loss = fn(hr, wr, t, linear_bias=br, reduction="none", batch_invariant=True, **kw)
        loss.float().sum().backward()
        res = {"loss": loss}
    return {**res, "dw": wr.grad, "db": br.grad}


def run_rank(rank: int, world: int) -> dict:
    """On 4 ranks (a spawned rank: tests/_gloo.py): the 2-rank cases on the group of ranks 0
    and 1, then the 4-rank cases on the world — one spawn for both group sizes."""
    import torch.distributed as dist

    pair = dist.new_group([0, 1])  # every rank takes part in creating it
    out = {}
    if rank < 2:
        for form, dtype in _tp_cases(2):
            out[f"2 {form} {dtype}"] = _run_form(form, dtype, TP_LAYOUTS[2], rank, pair)
        try:
            _run_form("tlp", torch.float32, TP_BAD[2], rank, pair)
            out["bad"] = ""
        except ValueError as e:
            out["bad"] = str(e)
    for form, dtype in _tp_cases(world):
        out[f"{world} {form} {dtype}"] = _run_form(form, dtype, TP_LAYOUTS[world], rank)
    return out


@pytest.mark.slow
def test_vocab_parallel_batch_invariant_bitwise(gloo_spawn, tmp_path):
    """At 2 ranks (every form) and 4 (the fused head, the logits form), uneven shards on the
    128-class grid (one empty): every rank's per-token outputs are the single device's bits;
    each rank's gradient is the single device's on its columns (logits) or rows (dW, db); a
    shard off the 128-class tiles raises on every rank."""
    ranks = gloo_spawn(__file__, 4, tmp_path, SPAWN_TIMEOUT_S)
    for world in (2, 4):
        layout = TP_LAYOUTS[world]
        for form, dtype in _tp_cases(world):
            single = _run_form(form, dtype)
            for rank, res in enumerate(ranks[:world]):
                got = res[f"{world} {form} {dtype}"]
                lo, hi = layout[rank][0], sum(layout[rank])
                for name, value in got.items():
                    want = single[name]
                    if name == "grad":
                        want = want[:, lo:hi]
                    elif name in ("dw", "db"):
                        want = want[lo:hi]
                    assert torch.equal(value, want), (world, form, dtype, rank, name)
    assert all("multiples of 128" in res["bad"] for res in ranks[:2])


def test_batch_invariant_paths_refuse_forward_ad_and_torch_func():
    """The invariant ops have reverse-mode autograd only: a forward-mode tangent or a
    torch.func transform is refused by name, never dropped (a silent zero tangent)."""
    import torch.autograd.forward_ad as fwAD

    x, t, _, _ = _logits_case(5, torch.float32, n=4)
    h, w, b, th = _head_case(5, torch.float32, n=4)
    calls = {
        "token_log_probs": lambda x_: token_log_probs(x_, t, batch_invariant=True),
        "token_log_probs (…, K)": lambda x_: token_log_probs(x_, t.clamp(min=0)[:, None]),
        "cross_entropy": lambda x_: cross_entropy(x_, t, batch_invariant=True),
        "linear_cross_entropy": lambda h_: linear_cross_entropy(h_, w, th, linear_bias=b,
                                                                batch_invariant=True),
        "linear_token_log_probs": lambda h_: linear_token_log_probs(h_, w, th,
                                                                    batch_invariant=True),
    }
    for name, fn in calls.items():
        primal = h if name.startswith("linear") else x
        with fwAD.dual_level():
            with pytest.raises(RuntimeError, match="reverse-mode autograd only"):
                fn(fwAD.make_dual(primal, torch.ones_like(primal)))
        with pytest.raises(RuntimeError, match="reverse-mode autograd only"):
            torch.func.grad(lambda p: fn(p).sum())(primal)  # noqa: B023

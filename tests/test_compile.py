"""The registered ops and the public functions under torch.compile and torch.library's checks.

- ``torch.library.opcheck`` over every registered ``probact_gpu::*`` op (a case per op, on small
  inputs; a test fails when an op is registered without one), with the checks that run through
  Triton's interpreter on CPU;
- ``torch.compile(fullgraph=True)`` traces every public function with no graph break, forward
  and backward, including ``cross_entropy(..., inplace_backward=True)`` (CPU: the aot_eager
  backend runs the same AOTAutograd tracing as inductor, with dynamic=True: one graph serves two
  sizes without recompiling; the gpu tier compiles with inductor, static shapes).
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

import probact_gpu as pg
from probact_gpu.options import CrossEntropyOptions

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter's inf − inf lanes

OPS_MODULES = ("softmax", "sigmoid", "bce", "cross_entropy", "linear_cross_entropy",
               "token_log_probs", "linear_token_log_probs", "distillation",
               "linear_distillation", "batch_invariant", "fused_head", "token_log_probs_index")
# opcheck's checks: schema, autograd registration and fake tensors run the op and its fake
# implementation; test_aot_dispatch_dynamic traces it with AOTAutograd and dynamic shapes.
ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
              "test_aot_dispatch_dynamic")
# An op whose registered backward scales a saved forward output in place (the fused gradients
# of cross-entropy / linear + CE): AOTAutograd's opcheck cannot partition that backward, and
# torch.compile takes an out-of-place branch instead (traced below).
NO_AOT = ALL_CHECKS[:3]


def _registered_ops() -> set[str]:
    for name in OPS_MODULES:
        importlib.import_module(f"probact_gpu.ops.{name}")
    importlib.import_module("probact_gpu.distributed")
    return {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
            if n.startswith("probact_gpu::")}


def _x(*shape, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _t(n, c, seed=1):
    t = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    t[1] = -100
    return t


def _ce(**kw):
    return CrossEntropyOptions.from_kwargs(**kw).schema_args()


def _tlp_stats():
    logits, t = _x(5, 9, grad=False), _t(5, 9)
    out = torch.ops.probact_gpu.token_log_probs(logits, t, -100, 1.0, 1.0, 4.0, 0.7, True, False,
                                                True)
    return logits, t, out[-1]


def _ltlp_saved():
    h, w, t, b = _x(6, 5, grad=False), _x(9, 5, grad=False, seed=4), _t(6, 9), _x(9, seed=5,
                                                                               grad=False)
    out = torch.ops.probact_gpu.linear_token_log_probs(h, w, t, b, -100, 1.0, 2.0, 3.0, 0.8,
                                                       False, False, True, 4)
    return h, w, t, b, out[-1]


# distillation's 13 schema options (DistillationOptions.schema_args): JSD with a hard term, a
# temperature, a softcap on the student and a scale on the teacher.
def _ds(divergence="jsd", hard_weight=0.5, shared_vocab=None):
    return (divergence, 0.3, 1.5, -100, hard_weight, False, shared_vocab, 1.0, 1.0, 4.0, 1.2,
            1.0, None)


def _ds_stats():
    s, t, tgt = _x(5, 9, grad=False), _x(5, 11, grad=False, seed=3), _t(5, 9)
    out = torch.ops.probact_gpu.distillation(s, t, tgt, *_ds(shared_vocab=9), True)
    return s, t, tgt, out[1]


def _topk_teacher(n=5, v=9, k=3):
    logp = torch.log_softmax(_x(n, v, grad=False, seed=6), -1)
    lp, idx = logp.topk(k, -1)
    return idx, lp


def _topk_stats():
    s, tgt = _x(5, 9, grad=False), _t(5, 9)
    idx, lp = _topk_teacher()
    out = torch.ops.probact_gpu.distillation_topk(s, idx, lp, tgt, "kl", 0.3, 1.0, -100, 0.5,
                                                  False, None, 1.0, 1.0, None, 1.0, 1.0, None,
                                                  True)
    return s, idx, lp, tgt, out[1]


def _ld_args(reduction):
    return (_x(6, 5), _x(9, 5, seed=4), _x(9, seed=5), _x(6, 7, grad=False, seed=7),
            _x(9, 7, grad=False, seed=8), None, _t(6, 9), *_ds("tvd", 0.0), reduction, None,
            None, 4, [True, True, True])


def _fused_saved(op, *args):
    """(h, W, t, b) and a forward's outputs of a fused head op (the backward ops' inputs)."""
    h, w, t, b = _x(6, 5, grad=False), _x(9, 5, grad=False, seed=4), _t(6, 9), _x(9, seed=5,
                                                                               grad=False)
    return (h, w, t, b), getattr(torch.ops.probact_gpu, op)(h, w, t, b, *args)


def _fused_tlp_bwd_args():
    (h, w, t, b), out = _fused_saved("fused_token_log_probs", -100, 1.0, 2.0, 3.0, 0.8, True,
                                     False, False, True, "ieee", None, None)
    return (h, w, t, b, out[-1], torch.rand(6), torch.rand(6), -100, 1.0, 2.0, 3.0, 0.8,
            "ieee", None, [True, True, True])


def _fused_lce_bwd_args():
    schema = _ce(weight=torch.rand(9), reduction="none", z_loss=1e-3)
    (h, w, t, b), out = _fused_saved("fused_linear_cross_entropy", *schema, False, "ieee",
                                     None, None)
    return (h, w, t, b, out[1], out[-1], torch.rand(6), *schema, "ieee", None,
            [True, True, True])


def _coef_bwd_args():
    logits, t, stats = _tlp_stats()
    return (logits, t.clamp(min=0)[:, None], stats, torch.rand(5, 3), torch.rand(5, 1), 1.0,
            1.0, 4.0, 0.7, True, -1)


# One case per registered op: (args, checks).
CASES = {
    "softmax_fwd": lambda: ((_x(4, 7), 1, False, None), ALL_CHECKS),
    "softmax_bwd": lambda: ((torch.softmax(_x(4, 7, grad=False), 1), _x(4, 7, grad=False), 1,
                             False, torch.float32), ALL_CHECKS),
    "sigmoid_fwd": lambda: ((_x(4, 7), True), ALL_CHECKS),
    "sigmoid_bwd": lambda: ((_x(4, 7, grad=False), _x(4, 7, grad=False, seed=2), True),
                            ALL_CHECKS),
    "bce_fwd": lambda: ((_x(4, 7), torch.rand(4, 7), torch.rand(7), None, "mean", False),
                        ALL_CHECKS),
    "bce_bwd": lambda: ((_x(4, 7, grad=False, seed=3), _x(4, 7, grad=False), torch.rand(4, 7),
                         None, torch.rand(7), "none"), ALL_CHECKS),
    "bce_regrad_": lambda: ((_x(4, 7, grad=False), torch.tensor(0.5), _x(4, 7, grad=False),
                             torch.rand(4, 7), None, None, "mean"), ALL_CHECKS),
    "cross_entropy": lambda: ((_x(4, 7), _t(4, 7), *_ce(
        weight=torch.rand(7), reduction="sum", label_smoothing=0.25, z_loss=0.01, softcap=2.0,
        logit_scale=1.5, logit_divisor=2.0, temperature=0.5, normalizer=3.0), False),
        ALL_CHECKS),
    "cross_entropy_inplace": lambda: ((_x(4, 7, grad=False), _t(4, 7),
                                       *_ce(label_smoothing=0.1)), ALL_CHECKS),
    "cross_entropy_bwd": lambda: ((_x(4, 7, grad=False), _t(4, 7), torch.randn(4),
                                   torch.rand(4), *_ce(reduction="none", softcap=3.0)),
                                  ALL_CHECKS),
    "cross_entropy_bwd_inplace": lambda: ((_x(4, 7, grad=False), _t(4, 7), torch.randn(4),
                                           torch.rand(4), *_ce(reduction="none")), ALL_CHECKS),
    "linear_cross_entropy": lambda: ((_x(6, 5), _x(9, 5, seed=4), _t(6, 9), _x(9, seed=5),
                                      *_ce(reduction="none", label_smoothing=0.1), 4, None,
                                      False, [True, True, True]), ALL_CHECKS),
    "linear_cross_entropy_bwd": lambda: ((_x(6, 5, grad=False), _x(9, 5, grad=False, seed=4),
                                          _t(6, 9), None, torch.randn(6) + 3.0, torch.rand(6),
                                          *_ce(reduction="none"), 4, None, False,
                                          [True, True, False]), ALL_CHECKS),
    "scale_grads": lambda: ((_x(6, 5, grad=False), _x(9, 5, grad=False), _x(9, grad=False),
                             torch.tensor(2.0)), ALL_CHECKS),
    # The forward-mode rules of the fused heads (tangents of every input, 6 tokens in chunks
    # of 4, a weighted mean with a z-loss).
    "linear_cross_entropy_jvp": lambda: ((_x(6, 5, grad=False), _x(9, 5, grad=False, seed=4),
                                          _t(6, 9), _x(9, grad=False, seed=5),
                                          torch.randn(6) + 3.0, _x(6, 5, grad=False, seed=6),
                                          _x(9, 5, grad=False, seed=7), _x(9, grad=False, seed=8),
                                          *_ce(weight=torch.rand(9), z_loss=0.01, softcap=3.0),
                                          4), ALL_CHECKS),
    "linear_token_log_probs_jvp": lambda: ((*_ltlp_saved(), _x(6, 5, grad=False, seed=6),
                                            None, _x(9, grad=False, seed=8), -100, 1.0, 2.0,
                                            3.0, 0.8, 4, True), ALL_CHECKS),
    # save_stats=False although the logits require grad (test_aot_dispatch_dynamic runs a
    # backward): the backward recomputes the statistics. It once read the empty stats tensor
    # out of bounds instead, which crashed the interpreter (eager too, no AOT or symbolic
    # shapes needed: test_token_log_probs_op_without_saved_stats_backward).
    "token_log_probs": lambda: ((_x(5, 9), _t(5, 9), -100, 1.0, 1.0, 4.0, 0.7, True, True,
                                 False), ALL_CHECKS),
    "token_log_probs_bwd": lambda: ((*_tlp_stats(), torch.rand(5), torch.rand(5), -100, 1.0,
                                     1.0, 4.0, 0.7), ALL_CHECKS),
    # 6 tokens in chunks of 4 (a short last chunk), a bias, entropy and argmax; no saved
    # statistics, as token_log_probs above.
    "linear_token_log_probs": lambda: ((_x(6, 5), _x(9, 5, seed=4), _t(6, 9), _x(9, seed=5),
                                        -100, 1.0, 2.0, 3.0, 0.8, True, True, False, 4),
                                       ALL_CHECKS),
    "linear_token_log_probs_bwd": lambda: ((*_ltlp_saved(), torch.rand(6), None, -100, 1.0,
                                            2.0, 3.0, 0.8, 4, [True, True, True]), ALL_CHECKS),
    # a teacher padded past the student (shared_vocab); no saved statistics (the backward
    # recomputes them, as token_log_probs above)
    "distillation": lambda: ((_x(5, 9), _x(5, 11, grad=False, seed=3), _t(5, 9),
                              *_ds(shared_vocab=9), False), ALL_CHECKS),
    "distillation_bwd": lambda: ((*_ds_stats(), torch.rand(5), *_ds(shared_vocab=9)),
                                 ALL_CHECKS),
    "distillation_topk": lambda: ((_x(5, 9), *_topk_teacher(), _t(5, 9), "reverse_kl", 0.3,
                                   1.0, -100, 0.5, False, None, 1.0, 1.0, 3.0, 1.0, 1.0, None,
                                   False), ALL_CHECKS),
    "distillation_topk_bwd": lambda: ((*_topk_stats(), torch.rand(5), "kl", 0.3, 1.0, -100, 0.5,
                                       False, None, 1.0, 1.0, None, 1.0, 1.0, None), ALL_CHECKS),
    # mean: the gradients computed in the forward (scaled in place by scale_grads' backward,
    # as linear_cross_entropy's: NO_AOT); none: the recomputing backward
    "linear_distillation": lambda: (_ld_args("none"), ALL_CHECKS),
    "linear_distillation_bwd": lambda: ((_x(6, 5, grad=False), _x(9, 5, grad=False, seed=4),
                                         None, _x(6, 7, grad=False, seed=7),
                                         _x(9, 7, grad=False, seed=8), None, _t(6, 9),
                                         torch.ops.probact_gpu.linear_distillation(
                                             *_ld_args("none"))[1].detach(), torch.rand(6),
                                         *_ds("tvd", 0.0), 4, [True, True, False]),
                                        ALL_CHECKS),


    # batch_invariant=True: the exact tile reduction on given logits, its elementwise backward,
    # the (…, K) index, the fused head (one 64 × 128 tile) for token log-probs and CE. The
    # backward ops skip the AOT check (NO_AOT): AOTAutograd traces them inside the public
    # functions' backward below (PUBLIC's *_invariant entries), and each run of them
    # interprets a GEMM.
    "invariant_token_log_probs": lambda: ((_x(5, 9), _t(5, 9), -100, 1.0, 1.0, 4.0, 0.7, True,
                                           True, False), ALL_CHECKS),
    "invariant_cross_entropy": lambda: ((_x(4, 7), _t(4, 7), *_ce(
        weight=torch.rand(7), reduction="mean", z_loss=0.01, softcap=2.0), True), ALL_CHECKS),
    "invariant_cross_entropy_bwd": lambda: ((_x(4, 7, grad=False), _t(4, 7), torch.randn(4),
                                             torch.rand(4, 3), torch.rand(4),
                                             *_ce(reduction="none", z_loss=0.01)), NO_AOT),
    "coef_bwd": lambda: (_coef_bwd_args(), NO_AOT),
    "token_log_probs_index": lambda: ((_x(5, 9), torch.randint(0, 9, (5, 3)), -100, 1.0, 1.0,
                                       None, 0.7, True, True, False), ALL_CHECKS),
    # every row computed (all_rows): a skipped row's lse is NaN, which opcheck's comparison
    # of two runs does not take as equal
    "fused_token_log_probs": lambda: ((_x(6, 5), _x(9, 5, seed=4), _t(6, 9), _x(9, seed=5),
                                       -100, 1.0, 2.0, 3.0, 0.8, True, True, True, False,
                                       "ieee", None, None), ALL_CHECKS),
    "fused_token_log_probs_bwd": lambda: (_fused_tlp_bwd_args(), NO_AOT),
    "fused_linear_cross_entropy": lambda: ((_x(6, 5), _x(9, 5, seed=4), _t(6, 9),
                                            _x(9, seed=5), *_ce(reduction="none", z_loss=1e-3),
                                            True, "ieee", None, None), ALL_CHECKS),
    "fused_linear_cross_entropy_bwd": lambda: (_fused_lce_bwd_args(), NO_AOT),
}


def test_every_registered_op_has_an_opcheck_case():
    assert _registered_ops() == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    _registered_ops()
    args, checks = CASES[name]()
    torch.library.opcheck(getattr(torch.ops.probact_gpu, name).default, args,
                          test_utils=checks)


def test_opcheck_linear_distillation_gradients_in_forward():
    """reduction='mean': the gradients computed in the forward (NO_AOT, as linear + CE)."""
    torch.library.opcheck(torch.ops.probact_gpu.linear_distillation.default,
                          _ld_args("mean"), test_utils=NO_AOT)


def test_opcheck_cross_entropy_fused_gradient():
    """The fused-gradient variant (NO_AOT: see above)."""
    args = (_x(4, 7), _t(4, 7), *_ce(weight=torch.rand(7), label_smoothing=0.25), True)
    torch.library.opcheck(torch.ops.probact_gpu.cross_entropy.default, args, test_utils=NO_AOT)


# --------------------------------------------------------------------------- torch.compile


def _softmax_and_linear_ce(x, w, t):
    return (pg.log_softmax(x @ w.T * 2.0, -1).sum() + pg.softmax(x, 0).square().sum()
            + pg.linear_cross_entropy(x, w, t, chunk_size=4)
            + pg.linear_cross_entropy(x, w, t, low_memory=True, reduction="sum"))


def _inputs(x, w, t):
    logits = x @ w.T
    return logits, torch.softmax(logits.detach() * 0.5, -1), t.clamp(min=0)


# Each public function (and each form of cross_entropy), as fn(x, w, t) -> scalar.
PUBLIC = {
    "softmax": lambda x, w, t: pg.softmax(x @ w.T, -1).square().sum(),
    "log_softmax": lambda x, w, t: pg.log_softmax(x @ w.T, 0).sum(),
    "sigmoid": lambda x, w, t: pg.sigmoid(x @ w.T).square().sum(),
    "logsigmoid": lambda x, w, t: pg.logsigmoid(x @ w.T).sum(),
    "bce_with_logits": lambda x, w, t: pg.binary_cross_entropy_with_logits(
        x @ w.T, torch.sigmoid(_inputs(x, w, t)[0].detach()),
        pos_weight=torch.full((w.shape[0],), 2.0, device=x.device)),
    "cross_entropy": lambda x, w, t: pg.cross_entropy(
        x @ w.T, t, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, temperature=0.8),
    "cross_entropy_none": lambda x, w, t: pg.cross_entropy(
        x @ w.T, t, reduction="none", logit_divisor=2.0).sum(),
    "cross_entropy_probs_normalizer": lambda x, w, t: pg.cross_entropy(
        x @ w.T, _inputs(x, w, t)[1], reduction="sum", normalizer=4.0),
    "cross_entropy_lse": lambda x, w, t: sum(
        v.sum() for v in pg.cross_entropy(x @ w.T, t, return_lse=True)),  # lse: no gradient
    "cross_entropy_inplace_mean": lambda x, w, t: pg.cross_entropy(
        x @ w.T, t, inplace_backward=True),
    "cross_entropy_inplace_sum": lambda x, w, t: pg.cross_entropy(
        (x @ w.T).view(-1, w.shape[0]), t, reduction="sum", inplace_backward=True),
    "linear_cross_entropy": lambda x, w, t: pg.linear_cross_entropy(x, w, t, chunk_size=4),
    "linear_cross_entropy_low_memory": lambda x, w, t: pg.linear_cross_entropy(
        x, w, t, low_memory=True, reduction="sum"),
    "token_log_probs": lambda x, w, t: pg.token_log_probs(
        x @ w.T, _inputs(x, w, t)[2], temperature=0.7).sum(),
    "linear_token_log_probs": lambda x, w, t: pg.linear_token_log_probs(
        x, w, _inputs(x, w, t)[2], chunk_size=4).sum(),
    "distillation_loss": lambda x, w, t: pg.distillation_loss(
        x @ w.T, (x @ w.T).detach().flip(0), t, divergence="jsd", beta=0.3, temperature=1.5,
        hard_weight=0.2),
    "distillation_loss_topk": lambda x, w, t: pg.distillation_loss(
        x @ w.T, pg.TopKTeacher(*reversed(torch.log_softmax((x @ w.T).detach().flip(0),
                                                            -1).topk(3, -1))), t,
        reduction="sum", normalizer=4.0),
    "linear_distillation_loss": lambda x, w, t: pg.linear_distillation_loss(
        x, w, x.detach().flip(0), w.detach(), t, divergence="tvd", chunk_size=4),
    # tensor options derived from the head (a learnt scale): their gradient reaches w; traced
    # with no host read
    "cross_entropy_tensor_scale": lambda x, w, t: pg.cross_entropy(
        x @ w.T, t, logit_scale=w[0, 0].exp(), temperature=w[1, 1].exp()),
    "linear_cross_entropy_tensor_divisor": lambda x, w, t: pg.linear_cross_entropy(
        x, w, t, softcap=4.0, logit_divisor=w[0, 0].exp(), chunk_size=4),
    "linear_distillation_loss_none": lambda x, w, t: pg.linear_distillation_loss(
        x, w, x.detach() * 2.0, w.detach(), t, divergence="kl", reduction="none",
        chunk_size=4).sum(),


    "token_log_probs_invariant_index": lambda x, w, t: pg.token_log_probs(
        x @ w.T, torch.stack([_inputs(x, w, t)[2]] * 2, -1), batch_invariant=True).sum(),
    "cross_entropy_invariant": lambda x, w, t: pg.cross_entropy(
        x @ w.T, t, z_loss=1e-3, batch_invariant=True),
    "linear_token_log_probs_invariant": lambda x, w, t: sum(pg.linear_token_log_probs(
        x, w, t, batch_invariant=True, return_entropy=True)[:2]).sum(),
    "linear_cross_entropy_invariant": lambda x, w, t: pg.linear_cross_entropy(
        x, w, t, batch_invariant=True, return_z_loss=True).loss,
}


def _compare(fn, backend, device, dynamic=False):
    """``fn`` compiled with fullgraph=True against eager, forward and backward. With
    ``dynamic``: compiled once with dynamic=True and run at two sizes (tokens and classes both
    change, as sequence lengths and vocabulary shards do); the second must not recompile
    (error_on_recompile) and is the one compared."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic or None)
    for i, (n, v) in enumerate(((8, 10), (13, 12)) if dynamic else ((8, 10),)):
        torch.manual_seed(i)
        x = torch.randn(n, 16, device=device, requires_grad=True)
        w = torch.randn(v, 16, device=device, requires_grad=True)
        t = torch.randint(0, v, (n,), device=device)
        t[2] = -100
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(x, w, t)
        out.backward()
    grads = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    ref = fn(x, w, t)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], w.grad)


def test_softmax_and_linear_ce_compile_fullgraph(device):
    torch._dynamo.reset()
    _compare(_softmax_and_linear_ce, "aot_eager", device)


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_function_compiles_fullgraph_dynamic(device, name):
    """torch.compile(fullgraph=True, dynamic=True): no graph break, one graph for every size
    (every cross-entropy-family op once failed here: the options' validation called math.isnan
    on the symbolic numbers Dynamo makes of defaults and module attributes). The static trace
    is test_softmax_and_linear_ce_compile_fullgraph's, and the gpu tier's with inductor."""
    torch._dynamo.reset()
    _compare(PUBLIC[name], "aot_eager", device, dynamic=True)


@pytest.mark.gpu
def test_softmax_and_linear_ce_compile_inductor_gpu(device):
    torch._dynamo.reset()
    _compare(_softmax_and_linear_ce, "inductor", device)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_function_compiles_inductor_gpu(device, name):
    torch._dynamo.reset()
    _compare(PUBLIC[name], "inductor", device)


# --------------------------------------------------------------------------- in place, compiled


def _peak_bytes(fn):
    """(peak bytes live during ``fn()`` above what was live before, its result): the CPU
    allocator's events under the profiler, which sees every allocation, a compiled graph's
    included (a dispatch mode would make Dynamo recompile)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak, out


def _inductor_memory_backend(donated):
    """AOTAutograd with inductor's own mutation decisions and nothing else (its C++ codegen
    costs minutes on a cold CPU): the forward graph after inductor's reinplace pass (which
    decides whether a functionalized mutation runs in the buffer itself or on a copy) and its
    decomposition of the functionalized op, run as FX; for the backward, the inputs AOTAutograd
    donates (saved tensors inductor may overwrite) are recorded in ``donated``."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.fx_passes.post_grad import decompose_auto_functionalized
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
    from torch._inductor.fx_utils import FakeTensorUpdater
    from torch._inductor.utils import get_donated_idxs

    def forward(gm, example_inputs):
        reinplace_inplaceable_ops(FakeTensorUpdater(gm), gm.graph)
        decompose_auto_functionalized(gm.graph)
        gm.recompile()
        return gm

    def backward(gm, example_inputs):
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        donated.extend(placeholders[i] for i in get_donated_idxs() or ())
        return gm

    return aot_autograd(fw_compiler=forward, bw_compiler=backward)


def test_cross_entropy_inplace_stays_in_place_under_compile(device):
    """torch.compile + inplace_backward=True writes the gradient into the logits: the compiled
    forward's peak is eager in-place's (one logits-sized buffer), where the out-of-place op it
    once traced instead held two (as eager out of place does); the backward's grad_output
    multiply reads that buffer as a donated input, its last use, which inductor overwrites (the
    gpu tier measures the whole step with inductor). reduction="none" cannot stay in place
    there: it warns, once."""
    if device.type != "cpu":
        pytest.skip("the gpu tier measures the compiled step with inductor")
    n, v = 64, 512
    logits_bytes = n * v * 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g).requires_grad_()
    w = torch.randn(v, 16, generator=g).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)

    def step(x, w, t, inplace=True):
        return pg.cross_entropy(x @ w.T, t, inplace_backward=inplace)

    torch._dynamo.reset()
    donated = []
    compiled = torch.compile(step, fullgraph=True, backend=_inductor_memory_backend(donated))
    compiled(x, w, t).backward()  # compile
    expected = (x.grad.clone(), w.grad.clone())
    peaks = {}
    for name, fn in (("eager", step), ("compiled", compiled),
                     ("out of place", functools.partial(step, inplace=False))):
        x.grad = w.grad = None
        peaks[name], loss = _peak_bytes(lambda fn=fn: fn(x, w, t))
        loss.backward()
        torch.testing.assert_close((x.grad, w.grad), expected)
    assert abs(peaks["compiled"] - peaks["eager"]) < 0.05 * logits_bytes, peaks
    assert peaks["out of place"] >= peaks["eager"] + 0.9 * logits_bytes, peaks
    saved = [p for p in donated if p.meta["val"].numel() == n * v]
    assert saved and all([u.target for u in p.users] == [torch.ops.aten.mul.Tensor]
                         for p in saved), donated
    compiled_none = torch.compile(
        lambda x, w, t: pg.cross_entropy(x @ w.T, t, reduction="none",
                                         inplace_backward=True).sum(),
        fullgraph=True, backend="aot_eager")
    with pytest.warns(RuntimeWarning, match="out of place") as record:
        for _ in range(2):  # warned while tracing: once
            compiled_none(x, w, t).backward()
    assert len([r for r in record if "out of place" in str(r.message)]) == 1


@pytest.mark.gpu
def test_cross_entropy_inplace_compiled_step_memory_gpu():
    """With inductor on CUDA the whole compiled step, forward and backward, peaks as eager's
    in-place step does (its grad_output multiply overwrites the donated gradient buffer), a
    logits-sized buffer below the out-of-place form."""
    dev = torch.device("cuda")
    n, v = 1024, 32768
    x = torch.randn(n, 64, device=dev, requires_grad=True)
    w = torch.randn(v, 64, device=dev, requires_grad=True)
    t = torch.randint(0, v, (n,), device=dev)

    def step(x, w, t, inplace=True):
        return pg.cross_entropy(x @ w.T, t, inplace_backward=inplace)

    def peak(fn):
        fn(x, w, t).backward()  # warm-up (compiles)
        x.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x, w, t).backward()
        torch.cuda.synchronize()
        x.grad = w.grad = None
        return torch.cuda.max_memory_allocated() - base

    torch._dynamo.reset()
    logits = n * v * 4
    eager = peak(step)
    compiled = peak(torch.compile(step, fullgraph=True))
    out_of_place = peak(torch.compile(functools.partial(step, inplace=False), fullgraph=True))
    assert compiled <= eager + 0.1 * logits, (compiled, eager)
    assert out_of_place >= compiled + 0.9 * logits, (out_of_place, compiled)

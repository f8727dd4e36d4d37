"""Vocab-parallel cross-entropy (and fused linear + cross-entropy) over torch.distributed.

Multi-rank runs spawn fresh interpreters that each run this file's ``run_rank`` (tests/_gloo.py,
through conftest.py's ``gloo_spawn``): a gloo process group on 127.0.0.1, TRITON_INTERPRET=1 set
before anything imports triton, a hard timeout so a hang fails instead of blocking CI. Each
spawn runs every case of its world size (process start-up, torch import
included, costs seconds: one spawn per world size), writes its losses, gradients and launches to
a file, and the parent compares them with the NumPy float64 reference and with
``probact_gpu.cross_entropy`` on the gathered logits. The same spawns then run the
vocab-parallel linear + cross-entropy cases (``LINEAR_CASES``, compared with
``probact_gpu.linear_cross_entropy`` on the gathered head), so they cost no extra start-up.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.distributed as dist

import probact_gpu as pg
from probact_gpu import reference, tiling
from probact_gpu.distributed import (
    VocabParallelCrossEntropyFunction,
    vocab_parallel_cross_entropy,
)
from probact_gpu.options import CrossEntropyOptions
from probact_gpu.testing import (
    TOLERANCES,
    assert_close_to_reference,
    poison_outputs,
    record_launches,
    to_numpy64,
)
from probact_gpu.tiling import RowConfig

SPAWN_TIMEOUT_S = 150  # a whole spawn: start-up, every case, teardown (~15 s on 2 cores)
N_ROWS = 6


@dataclass(frozen=True)
class Case:
    """One vocab-parallel call. ``layout`` is (start, size) per rank; ``explicit`` passes
    vocab_start_index (and ``with_size`` vocab_size) instead of learning them."""

    name: str
    layout: tuple[tuple[int, int], ...]
    why: str
    dtype: torch.dtype = torch.float32
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    explicit: bool = False
    with_size: bool = False
    config: RowConfig | None = None
    n_rows_by_rank: tuple[int, ...] = field(default=())  # N per rank when not all N_ROWS
    error: str = ""  # an invalid call: every rank must raise a ValueError containing this

    @property
    def vocab(self) -> int:
        return sum(size for _, size in self.layout)


def _in_rank_order(*sizes: int) -> tuple[tuple[int, int], ...]:
    starts = np.cumsum((0,) + sizes[:-1])
    return tuple((int(s), v) for s, v in zip(starts, sizes, strict=True))


CASES: dict[int, tuple[Case, ...]] = {
    2: (
        Case("uneven_mean", _in_rank_order(20, 17), "V = 37 not divisible by 2; torch defaults"),
        Case("smooth_zloss_softcap_sum", _in_rank_order(5, 32),
             "every option on, sum reduction, grad_output 0.75 scales the gradient",
             reduction="sum", label_smoothing=0.1, z_loss=0.02, softcap=4.0),
        Case("none_bf16_split3", _in_rank_order(24, 13),
             "per-row grad_output; bf16; 3 chunks per rank (the 13-wide shard's third chunk "
             "is empty: an all −inf partial)", dtype=torch.bfloat16, reduction="none",
             config=RowConfig("split", 8, 4, n_splits=3)),
        Case("explicit_reversed", ((17, 20), (0, 17)),
             "rank 0 holds the upper classes (vocab_start_index given); ignore_index = 5 is a "
             "real class id", explicit=True, ignore_index=5, label_smoothing=0.05),
    ),
    4: (
        Case("uneven4_all_options", _in_rank_order(5, 20, 1, 11),
             "4 uneven shards, one of a single class; smoothing, z-loss, softcap, mean",
             label_smoothing=0.2, z_loss=0.01, softcap=3.0),
        Case("empty_shard_fp64_sum", _in_rank_order(0, 13, 12, 12),
             "an empty shard; fp64; start and size given: no layout collective",
             dtype=torch.float64, reduction="sum", explicit=True, with_size=True),
        Case("rows_differ", _in_rank_order(10, 9, 9, 9),
             "rank 3 holds 7 rows, the others 6: every rank raises the same ValueError",
             n_rows_by_rank=(6, 6, 6, 7), error="same rows"),
        Case("overlapping_starts", ((0, 10), (5, 9), (14, 9), (23, 9)),
             "vocab_start_index given, rank 1's shard overlaps rank 0's: the layout check "
             "raises on every rank", explicit=True, error="tile"),
    ),
}


def _inputs(case: Case, n_rows: int = N_ROWS):
    """Full logits (rounded to the dtype), targets with ignored rows, and grad_output — the same
    in every process (seeded by the case's name)."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    full = torch.from_numpy(rng.standard_normal((n_rows, case.vocab)) * 2.0).to(case.dtype)
    target = torch.from_numpy(rng.integers(0, case.vocab, n_rows))
    target[1] = case.ignore_index
    if case.ignore_index >= 0:
        target[3] = case.ignore_index  # an ignore_index that is also a class id
    if case.reduction == "none":
        grad = torch.from_numpy(rng.standard_normal(n_rows)).to(case.dtype)
    else:
        grad = torch.tensor(0.75, dtype=case.dtype)
    return full, target, grad


# --------------------------------------------------------------------------- spawned ranks


def _layout_kwargs(case, start: int) -> dict:
    """The shard's layout keywords a case passes: vocab_start_index (``explicit``) and
    vocab_size (``with_size``)."""
    kwargs = {}
    if case.explicit:
        kwargs["vocab_start_index"] = start
    if case.with_size:
        kwargs["vocab_size"] = case.vocab
    return kwargs


def _trace(launches) -> list[tuple]:
    """(kernel, grid) of each recorded launch."""
    return [(launch.kernel, launch.grid) for launch in launches]


def run_rank(rank: int, world: int) -> dict:
    """Every case of this world size on this rank (a spawned rank: tests/_gloo.py)."""
    results = {}
    for case in CASES[world]:
        n_rows = case.n_rows_by_rank[rank] if case.n_rows_by_rank else N_ROWS
        full, target, grad = _inputs(case, n_rows)
        start, size = case.layout[rank]
        shard = full[:, start:start + size].clone().requires_grad_()
        kwargs = dict(reduction=case.reduction, ignore_index=case.ignore_index,
                      label_smoothing=case.label_smoothing, z_loss=case.z_loss,
                      softcap=case.softcap, config=case.config, **_layout_kwargs(case, start))
        try:
            with poison_outputs(), record_launches() as log:
                loss = vocab_parallel_cross_entropy(shard, target, **kwargs)
                n_fwd = len(log)
                loss.backward(grad)
        except ValueError as e:
            if not case.error:
                raise
            results[case.name] = {"error": str(e)}
            continue
        results[case.name] = {
            "loss": loss.detach(), "grad": shard.grad,
            "fwd": _trace(log[:n_fwd]), "bwd": _trace(log[n_fwd:]),
        }
    results[_LINEAR] = _run_linear_cases(rank, world)
    if world == 2:
        results[_DTENSOR] = _run_dtensor_cases(world)
        results[_TENSOR_OPTIONS] = _run_tensor_option_cases(rank)
    return results


# --------------------------------------------------------------------------- tensor options

_TENSOR_OPTIONS = "__tensor_options__"  # the key of the tensor-option calls in a rank's results
_TENSOR_LAYOUT = ((0, 20), (20, 17))


def _tensor_option_inputs():
    """Logits (6, 37), targets, hidden states (6, 8), head (37, 8), bias, float64, and the
    tensor options' values: the same in every process."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(N_ROWS, 37, generator=g, dtype=torch.float64) * 2.0
    target = torch.randint(0, 37, (N_ROWS,), generator=g)
    target[1] = -100
    h = torch.randn(N_ROWS, 8, generator=g, dtype=torch.float64)
    head = torch.randn(37, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(37, generator=g, dtype=torch.float64)
    return logits, target, h, head, bias, (1.3, 0.8, 1.6)


def _run_tensor_option_cases(rank: int) -> dict:
    """Tensor logit_scale / logit_divisor / temperature that require grad, on shards: each rank
    must get the whole gradient (its shard's part all-reduced; the bias shard's too)."""
    from probact_gpu.distributed import (
        vocab_parallel_linear_cross_entropy,
        vocab_parallel_token_log_probs,
    )

    logits, target, h, head, bias, values = _tensor_option_inputs()
    start, size = _TENSOR_LAYOUT[rank]
    out = {}
    s, d, temp = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values)
    x = logits[:, start:start + size].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, target, logit_scale=s, logit_divisor=d,
                                        temperature=temp)
    loss = loss + vocab_parallel_token_log_probs(x, target.clamp(min=0), logit_scale=s).sum()
    loss.backward()
    out["ce"] = {"loss": loss.detach(), "dx": x.grad, "ds": s.grad, "dd": d.grad,
                 "dt": temp.grad}
    s, d = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values[:2])
    hr = h.clone().requires_grad_()
    b = bias[start:start + size].clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(hr, head[start:start + size], target,
                                               linear_bias=b, logit_scale=s, logit_divisor=d,
                                               softcap=3.0)
    loss.backward()
    out["linear_ce"] = {"loss": loss.detach(), "dh": hr.grad, "db": b.grad, "ds": s.grad,
                        "dd": d.grad}
    return out


# --------------------------------------------------------------------------- DTensor inputs

_DTENSOR = "__dtensor__"  # the key of the DTensor calls in a rank's results


def _dtensor_inputs():
    """Logits (6, 37), targets, class weights, hidden states (6, 8), head (37, 8) and bias:
    the same in every process."""
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(N_ROWS, 37, generator=g) * 2.0
    target = torch.randint(0, 37, (N_ROWS,), generator=g)
    target[1] = -100
    weight = torch.rand(37, generator=g) + 0.5
    h = torch.randn(N_ROWS, 8, generator=g)
    head = torch.randn(37, 8, generator=g)
    bias = torch.randn(37, generator=g)
    return logits, target, weight, h, head, bias


def _run_dtensor_cases(world: int) -> dict:
    """The CE forms with DTensors sharded on the class dim (torch.chunk's layout: 19 + 18 of 37
    classes): logits Shard(-1); the linear heads' weight and bias Shard(0), the input plain."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from probact_gpu.distributed import (
        vocab_parallel_linear_cross_entropy,
        vocab_parallel_linear_token_log_probs,
    )

    logits, target, weight, h, head, bias = _dtensor_inputs()
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    x = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_()
    loss = vocab_parallel_cross_entropy(x, target, weight=weight, reduction="sum",
                                        label_smoothing=0.1)
    loss.backward()
    out["ce"] = {"loss": loss.detach(), "grad": x.grad.to_local(),
                 "placement": str(x.grad.placements)}
    hr = h.clone().requires_grad_()
    w = distribute_tensor(head, mesh, [Shard(0)]).requires_grad_()
    b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(hr, w, target, linear_bias=b, z_loss=1e-3)
    loss.backward()
    out["linear_ce"] = {"loss": loss.detach(), "dh": hr.grad, "dw": w.grad.to_local(),
                        "db": b.grad.to_local()}
    hr = h.clone().requires_grad_()
    w = distribute_tensor(head, mesh, [Shard(0)]).requires_grad_()
    logp = vocab_parallel_linear_token_log_probs(hr, w, target.clamp(min=0), temperature=0.7)
    logp.sum().backward()
    out["linear_tlp"] = {"logp": logp.detach(), "dh": hr.grad, "dw": w.grad.to_local()}
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def world_results(request, tmp_path_factory, gloo_spawn):
    world = request.param
    return world, gloo_spawn(__file__, world, tmp_path_factory.mktemp(f"world{world}"),
                             SPAWN_TIMEOUT_S)


# --------------------------------------------------------------------------- multi-rank tests


def _valid_cases(world: int) -> list[Case]:
    return [c for c in CASES[world] if not c.error]


@pytest.mark.slow
def test_vocab_parallel_matches_reference(world_results):
    """Every rank's loss, and the rank gradients concatenated in vocabulary order, against the
    float64 reference on the gathered logits."""
    world, results = world_results
    for case in _valid_cases(world):
        full, target, grad = _inputs(case)
        ref_loss, _, ref_grad = reference.cross_entropy(
            to_numpy64(full), target.numpy(), ignore_index=case.ignore_index,
            reduction=case.reduction, label_smoothing=case.label_smoothing, z_loss=case.z_loss,
            softcap=case.softcap, dy=to_numpy64(grad))
        for rank in range(world):
            assert_close_to_reference(results[rank][case.name]["loss"], ref_loss, case.dtype,
                                      f"{case.name}: loss on rank {rank}")
        assert_close_to_reference(_gathered_grad(case, results), ref_grad, case.dtype,
                                  f"{case.name}: gradient")


def _gathered_grad(case: Case, results: list[dict]) -> torch.Tensor:
    order = sorted(range(len(case.layout)), key=lambda r: case.layout[r][0])
    return torch.cat([results[r][case.name]["grad"] for r in order], dim=1)


@pytest.mark.slow
def test_vocab_parallel_matches_single_process_op(world_results, device):
    """Same loss and gradient as probact_gpu.cross_entropy on the gathered logits (run here, on
    the test device)."""
    from probact_gpu import cross_entropy

    world, results = world_results
    for case in _valid_cases(world):
        full, target, grad = (t.to(device) for t in _inputs(case))
        x = full.clone().requires_grad_()
        loss = cross_entropy(x, target, ignore_index=case.ignore_index, reduction=case.reduction,
                             label_smoothing=case.label_smoothing, z_loss=case.z_loss,
                             softcap=case.softcap)
        loss.backward(grad)
        assert_close_to_reference(results[0][case.name]["loss"], to_numpy64(loss), case.dtype,
                                  f"{case.name}: loss vs the single-process op")
        assert_close_to_reference(_gathered_grad(case, results), to_numpy64(x.grad), case.dtype,
                                  f"{case.name}: gradient vs the single-process op")


@pytest.mark.slow
def test_vocab_parallel_loss_identical_on_every_rank(world_results):
    world, results = world_results
    for case in _valid_cases(world):
        losses = [results[r][case.name]["loss"] for r in range(world)]
        for rank in range(1, world):
            assert torch.equal(losses[rank], losses[0]), (case.name, rank, losses)


@pytest.mark.slow
def test_vocab_parallel_launches_split_path_and_local_backward(world_results):
    """Forward: our statistics kernel on the shard (none for an empty one), the mean's divisors
    (the combine scales the z term by one of them) and the combine; backward: one gradient
    kernel over the shard only (its grid covers the local rows x chunks)."""
    world, results = world_results
    for case in _valid_cases(world):
        for rank in range(world):
            res = results[rank][case.name]
            fwd = [name for name, _ in res["fwd"]]
            empty = case.layout[rank][1] == 0
            expected = ([] if empty else ["cross_entropy_split_stats_kernel"]) \
                + (["cross_entropy_total_weight_kernel"] if case.reduction == "mean" else []) \
                + ["cross_entropy_combine_kernel"]
            assert fwd == expected, (case.name, rank, res["fwd"])
            if case.config is not None:
                assert res["fwd"][0][1] == (N_ROWS, case.config.n_splits), res["fwd"]
            bwd = [name for name, _ in res["bwd"]]
            assert bwd == ([] if empty else ["cross_entropy_bwd_kernel"]), (case.name, rank, bwd)
            assert res["grad"].shape == (N_ROWS, case.layout[rank][1])


@pytest.mark.slow
def test_vocab_parallel_bad_layout_raises_on_every_rank(world_results):
    world, results = world_results
    for case in CASES[world]:
        if case.error:
            for rank in range(world):
                assert case.error in results[rank][case.name].get("error", ""), \
                    (case.name, rank, results[rank][case.name])


# --------------------------------------------------------------------------- one process


def _ce_args(**overrides):
    args = dict(ignore_index=-100, reduction="mean", label_smoothing=0.1, z_loss=0.01,
                softcap=5.0)
    args.update(overrides)
    return args


def _check_against_reference(loss, x, target, args, dtype=torch.float32):
    """``x`` is the leaf the loss was computed from, after backward."""
    ref_loss, _, ref_grad = reference.cross_entropy(to_numpy64(x), to_numpy64(target).astype(
        np.int64), **args)
    assert_close_to_reference(loss, ref_loss, dtype, "loss")
    assert_close_to_reference(x.grad, ref_grad, dtype, "gradient")


def test_vocab_parallel_without_process_group_is_the_local_op(rng, device):
    assert not (dist.is_available() and dist.is_initialized())
    x = torch.from_numpy(rng.standard_normal((5, 23))).float().to(device).requires_grad_()
    target = torch.tensor([3, -100, 22, 0, 7], device=device)
    args = _ce_args()
    with record_launches() as log:
        loss = vocab_parallel_cross_entropy(x, target, vocab_start_index=0, vocab_size=23, **args)
        loss.backward()
    assert "cross_entropy_fwd_kernel" in [launch.kernel for launch in log]
    assert "cross_entropy_split_stats_kernel" not in [launch.kernel for launch in log]
    _check_against_reference(loss, x, target, args)


def test_vocab_parallel_world_size_one(world_of_one, rng, device):
    """The public function takes the local op; the Function runs the split path and its
    collectives over the group of one, and both match the reference."""
    x = torch.from_numpy(rng.standard_normal((4, 29))).float().to(device).requires_grad_()
    target = torch.tensor([28, 0, -100, 13], device=device)
    args = _ce_args(reduction="sum")
    with record_launches() as log:
        loss = vocab_parallel_cross_entropy(x, target, **args)
        loss.backward()
    assert "cross_entropy_fwd_kernel" in [launch.kernel for launch in log]
    _check_against_reference(loss, x, target, args)
    x.grad = None
    with record_launches() as log:
        options = CrossEntropyOptions.from_kwargs(reduction="sum", label_smoothing=0.1,
                                                  z_loss=0.01, softcap=5.0)
        loss = VocabParallelCrossEntropyFunction.apply(x, target, None, 0, 29, options, None)
        loss.backward()
    assert [launch.kernel for launch in log] == [
        "cross_entropy_split_stats_kernel", "cross_entropy_combine_kernel",
        "cross_entropy_bwd_kernel"]
    _check_against_reference(loss, x, target, args)


def test_vocab_parallel_world_size_one_rejects_a_partial_shard(world_of_one, device):
    x = torch.zeros(2, 5, device=device)
    with pytest.raises(ValueError, match="whole vocabulary"):
        vocab_parallel_cross_entropy(x, torch.zeros(2, dtype=torch.long, device=device),
                                     vocab_size=9)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long), {}), ValueError,
         r"\(N, V_local\)"),
        (lambda: (torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), {}), ValueError,
         "shape \\(2,\\)"),
        (lambda: (torch.zeros(2, 3), torch.zeros(2), {}), ValueError, "int32/int64"),
        (lambda: (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long, device="meta"), {}),
         ValueError, "one device"),
        (lambda: (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), {}),
         TypeError, "floating"),
        (lambda: (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {"reduction": "avg"}),
         ValueError, "reduction"),
        (lambda: (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {"z_loss": -1.0}),
         ValueError, "z_loss"),
        (lambda: (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {"softcap": 0.0}),
         ValueError, "softcap"),
        (lambda: (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                  {"vocab_start_index": -1}), ValueError, "vocab_start_index"),
        (lambda: (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                  {"vocab_start_index": 3}), ValueError, "whole vocabulary"),
        (lambda: (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {"group": object()}),
         RuntimeError, "init_process_group"),
    ],
    ids=["3d_input", "target_rows", "float_target", "mixed_devices", "int_logits",
         "bad_reduction", "negative_z_loss", "zero_softcap", "negative_start",
         "start_without_group", "group_without_init"],
)
def test_vocab_parallel_rejects_bad_arguments(make, error, match):
    x, target, kwargs = make()
    with pytest.raises(error, match=match):
        vocab_parallel_cross_entropy(x, target, **kwargs)


def test_vocab_parallel_tolerances_cover_every_dtype_used():
    used = {c.dtype for cases in CASES.values() for c in cases}
    assert used <= set(TOLERANCES)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_vocab_parallel_nccl_world_size_one_large(world_of_one, device):
    """NCCL all_reduces on CUDA tensors around our kernels at an LM-head shape (bf16, 128256
    classes, 512 rows), through the Function (the public function would take the local op)."""
    rng = np.random.default_rng(7)
    n, v = 512, 128256
    x = torch.from_numpy(rng.standard_normal((n, v)).astype(np.float32)).to(device, torch.bfloat16)
    x.requires_grad_()
    target = torch.from_numpy(rng.integers(0, v, n)).to(device)
    target[::7] = -100
    options = CrossEntropyOptions.from_kwargs(reduction="sum", label_smoothing=0.1, z_loss=1e-4,
                                              softcap=30.0)
    loss = VocabParallelCrossEntropyFunction.apply(x, target, None, 0, v, options, None)
    loss.backward()
    z = 30.0 * torch.tanh(x.detach().float() / 30.0)
    z.requires_grad_()
    valid = target != -100
    expected = torch.nn.functional.cross_entropy(z, target, label_smoothing=0.1,
                                                 reduction="sum") \
        + 1e-4 * (torch.logsumexp(z, 1)[valid] ** 2).sum()
    expected.backward()
    torch.testing.assert_close(loss.float(), expected.detach(), atol=0.0, rtol=1e-2)
    # sum, not mean: the non-target entries are p ≈ 1e-5, well above atol
    dx_expected = z.grad * (1 - (z.detach() / 30.0) ** 2)
    torch.testing.assert_close(x.grad.float(), dx_expected, atol=1e-7, rtol=2e-2)


# --------------------------------------------------------------------------- linear + CE
# vocab_parallel_linear_cross_entropy: run by the same spawned ranks after CASES (no new spawn).

_LINEAR = "__linear__"  # the key of the linear cases in a rank's results
HIDDEN = 8


@dataclass(frozen=True)
class LinearCase:
    """One vocab-parallel linear + CE call: the (V, HIDDEN) head split by ``layout`` (start,
    size per rank), hidden states of shape ``lead`` + (HIDDEN,) replicated on every rank."""

    name: str
    layout: tuple[tuple[int, int], ...]
    why: str
    lead: tuple[int, ...] = (7,)
    dtype: torch.dtype = torch.float32
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    class_weight: bool = False
    bias: bool = True
    chunk_size: int | None = None
    config: RowConfig | None = None
    explicit: bool = False
    with_size: bool = False
    grads: tuple[str, ...] = ("input", "weight", "bias")  # which leaves require grad
    hidden_by_rank: tuple[int, ...] = field(default=())
    error: str = ""

    @property
    def vocab(self) -> int:
        return sum(size for _, size in self.layout)

    @property
    def n_tokens(self) -> int:
        return int(np.prod(self.lead))

    @property
    def n_chunks(self) -> int:
        return -(-self.n_tokens // (self.chunk_size or self.n_tokens))


LINEAR_CASES: dict[int, tuple[LinearCase, ...]] = {
    2: (
        LinearCase("lin_uneven_mean_chunk3", _in_rank_order(20, 17),
                   "V = 37 over 2 ranks; 3 token chunks, the last of one token; torch defaults",
                   chunk_size=3),
        LinearCase("lin_none_options_3d_input", _in_rank_order(5, 32),
                   "(2, 4, H) input, per-token grad_output; smoothing, z-loss, softcap, "
                   "logit_scale, global class weights; no bias; 2 chunks, the last short",
                   lead=(2, 4), reduction="none", label_smoothing=0.1, z_loss=0.02, softcap=4.0,
                   logit_scale=0.8, class_weight=True, bias=False, chunk_size=5,
                   grads=("input", "weight")),
        LinearCase("lin_bf16_sum_frozen_input", _in_rank_order(24, 13),
                   "bf16 head, dW summed over 4 chunks in fp32; input needs no gradient: no "
                   "dh and no backward all_reduce", dtype=torch.bfloat16, reduction="sum",
                   chunk_size=2, grads=("weight", "bias")),
        LinearCase("lin_explicit_reversed_split3", ((17, 20), (0, 17)),
                   "rank 0 holds the upper classes (vocab_start_index given); ignore_index 5 "
                   "is a class id; 3 splits per chunk row; frozen head: dh and db only",
                   explicit=True, ignore_index=5, label_smoothing=0.05, reduction="sum",
                   chunk_size=4, config=RowConfig("split", 8, 4, n_splits=3),
                   grads=("input", "bias")),
    ),
    4: (
        LinearCase("lin4_uneven_one_class", _in_rank_order(5, 20, 1, 11),
                   "4 uneven shards, one of a single class; every option, class weights, "
                   "mean; 4 chunks of 2 tokens", label_smoothing=0.2, z_loss=0.01, softcap=3.0,
                   class_weight=True, chunk_size=2),
        LinearCase("lin4_empty_shard_fp64_none", _in_rank_order(0, 13, 12, 12),
                   "an empty shard (its dh share is zeros, it still joins the all_reduce); "
                   "fp64; per-token grad_output; start and size given: no layout collective; "
                   "default chunk (one)", dtype=torch.float64, reduction="none", explicit=True,
                   with_size=True),
        LinearCase("lin4_hidden_differs", _in_rank_order(10, 9, 9, 9),
                   "rank 3's hidden size is 9, the others 8: every rank raises the same "
                   "ValueError (the dh all_reduce would otherwise mismatch)",
                   hidden_by_rank=(8, 8, 8, 9), error="same hidden size"),
    ),
}


def _linear_inputs(case: LinearCase, hidden: int = HIDDEN):
    """Hidden states, the full head (weight, bias), global class weights, targets with ignored
    tokens, grad_output: the same in every process (seeded by the case's name)."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))

    def make(shape, scale=1.0):
        return torch.from_numpy(rng.standard_normal(shape) * scale).to(case.dtype)

    h = make(case.lead + (hidden,))
    weight = make((case.vocab, hidden), 0.6)
    bias = make((case.vocab,), 0.5) if case.bias else None
    class_weight = torch.from_numpy(rng.uniform(0.5, 2.0, case.vocab)).to(case.dtype) \
        if case.class_weight else None
    target = torch.from_numpy(rng.integers(0, case.vocab, case.lead))
    flat = target.view(-1)
    flat[1] = case.ignore_index
    if case.ignore_index >= 0:
        flat[3] = case.ignore_index
    grad = make(case.lead) if case.reduction == "none" else torch.tensor(0.75, dtype=case.dtype)
    return h, weight, bias, class_weight, target, grad


class _CountCollectives:
    """Record every ``dist.all_reduce`` (reduce op, shape) made inside the block."""

    def __init__(self):
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __enter__(self):
        self._orig = dist.all_reduce

        def counted(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            name = {dist.ReduceOp.MAX: "max", dist.ReduceOp.SUM: "sum"}.get(op, str(op))
            self.calls.append((name, tuple(tensor.shape)))
            return self._orig(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _run_linear_cases(rank: int, world: int) -> dict:
    from probact_gpu.distributed import vocab_parallel_linear_cross_entropy

    results = {}
    for case in LINEAR_CASES[world]:
        hidden = case.hidden_by_rank[rank] if case.hidden_by_rank else HIDDEN
        h, weight, bias, class_weight, target, grad = _linear_inputs(case, hidden)
        start, size = case.layout[rank]
        leaves = {"input": h.clone(), "weight": weight[start:start + size].clone(),
                  "bias": None if bias is None else bias[start:start + size].clone()}
        for name in case.grads:
            leaves[name].requires_grad_()
        kwargs = dict(reduction=case.reduction, ignore_index=case.ignore_index,
                      label_smoothing=case.label_smoothing, z_loss=case.z_loss,
                      softcap=case.softcap, logit_scale=case.logit_scale,
                      weight=class_weight, chunk_size=case.chunk_size, config=case.config,
                      **_layout_kwargs(case, start))
        try:
            with poison_outputs(), record_launches() as log, _CountCollectives() as fwd_comm:
                loss = vocab_parallel_linear_cross_entropy(
                    leaves["input"], leaves["weight"], target, linear_bias=leaves["bias"],
                    **kwargs)
                n_fwd = len(log)
            with poison_outputs(), record_launches() as bwd_log, \
                    _CountCollectives() as bwd_comm:
                loss.backward(grad)
        except ValueError as e:
            if not case.error:
                raise
            results[case.name] = {"error": str(e)}
            continue
        results[case.name] = {
            "loss": loss.detach(),
            **{f"d_{name}": None if t is None else t.grad for name, t in leaves.items()},
            "fwd": _trace(log[:n_fwd]), "bwd": _trace(bwd_log),
            "fwd_comm": fwd_comm.calls, "bwd_comm": bwd_comm.calls,
        }
    return results


def _valid_linear_cases(world: int) -> list[LinearCase]:
    return [c for c in LINEAR_CASES[world] if not c.error]


def _linear_reference(case: LinearCase):
    """Loss, dh, dW, db in float64 (16-bit: from the logits rounded as the matmul rounds them)."""
    h, weight, bias, class_weight, target, grad = _linear_inputs(case)
    h64, w64 = to_numpy64(h), to_numpy64(weight)
    if case.dtype in (torch.float16, torch.bfloat16):
        logits = h.float().reshape(-1, HIDDEN) @ weight.float().T
        logits = to_numpy64((logits if bias is None else logits + bias.float()).to(case.dtype))
    else:
        logits = h64.reshape(-1, HIDDEN) @ w64.T + (0.0 if bias is None else to_numpy64(bias))
    loss, _, dlogits = reference.cross_entropy(
        logits, target.reshape(-1).numpy(),
        weight=None if class_weight is None else to_numpy64(class_weight),
        ignore_index=case.ignore_index, reduction=case.reduction,
        label_smoothing=case.label_smoothing, z_loss=case.z_loss, softcap=case.softcap,
        logit_scale=case.logit_scale,
        dy=to_numpy64(grad).reshape(-1) if grad.ndim else float(grad))
    if case.reduction == "none":
        loss = loss.reshape(case.lead)
    return {"loss": loss, "d_input": (dlogits @ w64).reshape(h64.shape),
            "d_weight": dlogits.T @ h64.reshape(-1, HIDDEN), "d_bias": dlogits.sum(0)}


def _gathered(case, results: list[dict], key: str) -> torch.Tensor:
    order = sorted(range(len(case.layout)), key=lambda r: case.layout[r][0])
    return torch.cat([results[r][_LINEAR][case.name][key] for r in order], dim=0)


def _linear_outputs(case, results: list[dict]):
    """(name, value on every rank or gathered over the shards) of each expected output."""
    yield "loss", [results[r][_LINEAR][case.name]["loss"] for r in range(len(results))]
    if "input" in case.grads:
        yield "d_input", [results[r][_LINEAR][case.name]["d_input"] for r in range(len(results))]
    if "weight" in case.grads:
        yield "d_weight", [_gathered(case, results, "d_weight")]
    if "bias" in case.grads:
        yield "d_bias", [_gathered(case, results, "d_bias")]


@pytest.mark.slow
def test_vocab_parallel_linear_matches_reference(world_results):
    """Loss and d input on every rank, d weight and d bias gathered over the shards in
    vocabulary order, against float64 NumPy on the full head."""
    world, results = world_results
    for case in _valid_linear_cases(world):
        ref = _linear_reference(case)
        for name, values in _linear_outputs(case, results):
            for rank, value in enumerate(values):
                assert_close_to_reference(value, np.asarray(ref[name]), case.dtype,
                                          f"{case.name}: {name} (rank {rank})")


@pytest.mark.slow
def test_vocab_parallel_linear_matches_single_process_op(world_results, device):
    """Same loss and gradients as probact_gpu.linear_cross_entropy on the gathered head, with
    the same options and token chunks (run here, on the test device)."""
    import probact_gpu as pg

    world, results = world_results
    for case in _valid_linear_cases(world):
        h, weight, bias, class_weight, target, grad = (
            None if t is None else t.to(device) for t in _linear_inputs(case))
        leaves = {"input": h, "weight": weight, "bias": bias}
        for name in case.grads:
            leaves[name].requires_grad_()
        loss = pg.linear_cross_entropy(
            h, weight, target, linear_bias=bias, reduction=case.reduction,
            ignore_index=case.ignore_index, label_smoothing=case.label_smoothing,
            z_loss=case.z_loss, softcap=case.softcap, logit_scale=case.logit_scale,
            weight=class_weight, chunk_size=case.chunk_size)
        loss.backward(grad)
        expected = {"loss": loss, **{f"d_{n}": t.grad for n, t in leaves.items() if t is not None}}
        for name, values in _linear_outputs(case, results):
            for rank, value in enumerate(values):
                assert_close_to_reference(value, to_numpy64(expected[name]), case.dtype,
                                          f"{case.name}: {name} (rank {rank}) vs the local op")


@pytest.mark.slow
def test_vocab_parallel_linear_loss_and_dh_identical_on_every_rank(world_results):
    world, results = world_results
    for case in _valid_linear_cases(world):
        for key in ("loss", "d_input") if "input" in case.grads else ("loss",):
            values = [results[r][_LINEAR][case.name][key] for r in range(world)]
            for rank in range(1, world):
                assert torch.equal(values[rank], values[0]), (case.name, key, rank)


def _vocab_blocks(case: LinearCase, v_local: int) -> int:
    """Gradient launches of a rank's backward: its classes walked in blocks as large as a token
    chunk's (C, V_local) buffer (none for an empty shard)."""
    elem = torch.empty((), dtype=case.dtype).element_size()
    n = case.n_tokens
    tokens = case.chunk_size or tiling.choose_token_chunk(n, v_local, elem)
    block = tiling.choose_vocab_chunk(n, v_local, elem, max(1, tokens * v_local * elem))
    return -(-v_local // block)


@pytest.mark.slow
def test_vocab_parallel_linear_collectives_launches_and_needed_grads(world_results):
    """Forward: one statistics launch per token chunk (none on an empty shard), the combine,
    the mean's divisor; exactly one MAX all_reduce of N and one SUM of (N, 3). Backward: one
    gradient launch per block of the shard's classes; one SUM all_reduce of (N, H) iff input
    needs a gradient; no gradient for a leaf that does not require one."""
    world, results = world_results
    for case in _valid_linear_cases(world):
        n = case.n_tokens
        for rank in range(world):
            res = results[rank][_LINEAR][case.name]
            empty = case.layout[rank][1] == 0
            stats = [] if empty else ["cross_entropy_split_stats_kernel"] * case.n_chunks
            expected = stats \
                + (["cross_entropy_total_weight_kernel"] if case.reduction == "mean" else []) \
                + ["cross_entropy_combine_kernel"]
            assert [k for k, _ in res["fwd"]] == expected, (case.name, rank, res["fwd"])
            if case.config is not None:
                assert res["fwd"][0][1] == (case.chunk_size, case.config.n_splits), res["fwd"]
            assert res["fwd_comm"] == [("max", (n,)), ("sum", (n, 3))], (case.name, rank)
            bwd = ["cross_entropy_bwd_kernel"] * _vocab_blocks(case, case.layout[rank][1])
            assert [k for k, _ in res["bwd"]] == bwd, (case.name, rank, res["bwd"])
            comm = [("sum", (n, HIDDEN))] if "input" in case.grads else []
            assert res["bwd_comm"] == comm, (case.name, rank, res["bwd_comm"])
            for name in ("input", "weight", "bias"):
                got = res[f"d_{name}"]
                assert (got is not None) == (name in case.grads), (case.name, rank, name)
            if "weight" in case.grads:
                assert res["d_weight"].shape == (case.layout[rank][1], HIDDEN)


@pytest.mark.slow
def test_vocab_parallel_linear_bad_layout_raises_on_every_rank(world_results):
    world, results = world_results
    for case in LINEAR_CASES[world]:
        if case.error:
            for rank in range(world):
                got = results[rank][_LINEAR][case.name]
                assert case.error in got.get("error", ""), (case.name, rank, got)


def _lin_problem(rng, device, n=6, hidden=5, vocab=19, dtype=torch.float32):
    h = torch.from_numpy(rng.standard_normal((n, hidden))).to(device, dtype).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((vocab, hidden)) * 0.5).to(device, dtype)
    b = torch.from_numpy(rng.standard_normal(vocab)).to(device, dtype)
    target = torch.from_numpy(rng.integers(0, vocab, n)).to(device)
    target[2] = -100
    return h, w.requires_grad_(), b.requires_grad_(), target


def _check_linear_against_reference(loss, h, w, b, target, args, grad=1.0):
    logits = to_numpy64(h) @ to_numpy64(w).T + to_numpy64(b)
    ref_loss, _, dlogits = reference.cross_entropy(logits, target.cpu().numpy(), dy=grad, **args)
    assert_close_to_reference(loss, np.asarray(ref_loss), torch.float32, "loss")
    assert_close_to_reference(h.grad, dlogits @ to_numpy64(w), torch.float32, "d input")
    assert_close_to_reference(w.grad, dlogits.T @ to_numpy64(h), torch.float32, "d weight")
    assert_close_to_reference(b.grad, dlogits.sum(0), torch.float32, "d bias")


def test_vocab_parallel_linear_without_process_group_is_the_local_op(rng, device):
    from probact_gpu.distributed import vocab_parallel_linear_cross_entropy

    assert not (dist.is_available() and dist.is_initialized())
    h, w, b, target = _lin_problem(rng, device)
    args = _ce_args()
    with record_launches() as log:
        loss = vocab_parallel_linear_cross_entropy(h, w, target, linear_bias=b,
                                                   vocab_start_index=0, vocab_size=19,
                                                   chunk_size=4, **args)
        loss.backward()
    kernels = [launch.kernel for launch in log]
    assert "cross_entropy_fwd_kernel" in kernels
    assert "cross_entropy_split_stats_kernel" not in kernels
    _check_linear_against_reference(loss, h, w, b, target, args)


def test_vocab_parallel_linear_world_size_one(world_of_one, rng, device):
    """The public function takes the local op; the Function runs the split path and its
    collectives over the group of one (2 token chunks), and both match the reference."""
    from probact_gpu.distributed import (
        VocabParallelLinearCrossEntropyFunction,
        vocab_parallel_linear_cross_entropy,
    )

    h, w, b, target = _lin_problem(rng, device)
    args = _ce_args(reduction="none")
    grad = rng.standard_normal(6)
    grad_t = torch.from_numpy(grad).float().to(device)
    with record_launches() as log:
        loss = vocab_parallel_linear_cross_entropy(h, w, target, linear_bias=b, chunk_size=4,
                                                   **args)
        loss.backward(grad_t)
    assert "cross_entropy_split_stats_kernel" not in [launch.kernel for launch in log]
    _check_linear_against_reference(loss, h, w, b, target, args, grad)
    for t in (h, w, b):
        t.grad = None
    options = CrossEntropyOptions.from_kwargs(**args)
    with record_launches() as log:
        loss = VocabParallelLinearCrossEntropyFunction.apply(h, w, b, target, None, 0, 19,
                                                             options, (4, None, None))
        loss.backward(grad_t)
    assert [launch.kernel for launch in log] == [
        "cross_entropy_split_stats_kernel", "cross_entropy_split_stats_kernel",
        "cross_entropy_combine_kernel", "cross_entropy_bwd_kernel", "cross_entropy_bwd_kernel"]
    _check_linear_against_reference(loss, h, w, b, target, args, grad)


_NEW_OPTIONS = [
    dict(reduction="mean", weight=True, label_smoothing=0.1, logit_divisor=2.5),
    dict(reduction="none", softcap=3.0, temperature=0.7, logit_scale=1.3, z_loss=0.0),
    dict(reduction="sum", normalizer=6.0, temperature=1.5, weight=True),
]


def _torch_ce64(logits, target, reduction, dy, weight=None, label_smoothing=0.0,
                normalizer=None, z_loss=0.0, **transform):
    """Loss and d logits from float64 torch autograd (transform in options.py's order)."""
    from probact_gpu.options import HeadTransform

    x = logits.detach().double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(
        HeadTransform(**transform).apply(x), target, reduction=reduction,
        weight=None if weight is None else weight.double(), label_smoothing=label_smoothing)
    if normalizer is not None:
        loss = loss / normalizer
    loss.backward(dy.double())
    return loss.detach(), x.grad


def _new_options_problem(rng, device, opts, vocab=19, n=6):
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = torch.from_numpy(rng.uniform(0.5, 2.0, vocab)).float().to(device)
    target = torch.from_numpy(rng.integers(0, vocab, n)).to(device)
    dy = torch.from_numpy(rng.standard_normal(n) if opts["reduction"] == "none"
                          else np.array(0.5)).float().to(device)
    return opts, target, dy


@pytest.mark.parametrize("opts", _NEW_OPTIONS, ids=lambda o: o["reduction"])
def test_vocab_parallel_functions_take_every_option(world_of_one, opts, rng, device):
    """Per-class weights, logit_divisor, temperature, logit_scale and the normalizer through both
    Functions' split paths (a group of one), against float64 torch on the whole head."""
    from probact_gpu.distributed import VocabParallelLinearCrossEntropyFunction

    opts, target, dy = _new_options_problem(rng, device, opts)
    options = CrossEntropyOptions.from_kwargs(**opts)
    x = torch.from_numpy(rng.standard_normal((6, 19))).float().to(device).requires_grad_()
    loss = VocabParallelCrossEntropyFunction.apply(x, target, None, 0, 19, options, None)
    loss.backward(dy)
    ref_loss, ref_dx = _torch_ce64(x, target, dy=dy, **opts)
    assert_close_to_reference(loss, to_numpy64(ref_loss), torch.float32, "loss")
    assert_close_to_reference(x.grad, to_numpy64(ref_dx), torch.float32, "d logits")
    h, w, b, _ = _lin_problem(rng, device)
    loss = VocabParallelLinearCrossEntropyFunction.apply(h, w, b, target, None, 0, 19, options,
                                                         (4, None, None))
    loss.backward(dy)
    logits = h.detach() @ w.detach().T + b.detach()
    ref_loss, dlogits = _torch_ce64(logits, target, dy=dy, **opts)
    assert_close_to_reference(loss, to_numpy64(ref_loss), torch.float32, "linear loss")
    for name, got, want in (("dh", h.grad, dlogits @ w.detach().double()),
                            ("dW", w.grad, dlogits.T @ h.detach().double()),
                            ("db", b.grad, dlogits.sum(0))):
        assert_close_to_reference(got, to_numpy64(want), torch.float32, name)


def test_vocab_parallel_second_derivatives_raise(world_of_one, rng, device):
    """Both Functions' gradients come from kernels: create_graph=True raises, not a constant."""
    from probact_gpu.distributed import VocabParallelLinearCrossEntropyFunction

    options = CrossEntropyOptions()
    x = torch.from_numpy(rng.standard_normal((4, 19))).float().to(device).requires_grad_()
    target = torch.tensor([18, 0, -100, 13], device=device)
    loss = VocabParallelCrossEntropyFunction.apply(x, target, None, 0, 19, options, None)
    with pytest.raises(RuntimeError, match="vocab_parallel_cross_entropy does not support "
                                           "second derivatives"):
        torch.autograd.grad(loss, x, create_graph=True)
    h, w, b, target = _lin_problem(rng, device)
    loss = VocabParallelLinearCrossEntropyFunction.apply(h, w, b, target, None, 0, 19, options,
                                                         (None, None, None))
    with pytest.raises(RuntimeError, match="vocab_parallel_linear_cross_entropy does not "
                                           "support second derivatives"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_vocab_parallel_linear_world_size_one_rejects_a_partial_shard(world_of_one, device):
    from probact_gpu.distributed import vocab_parallel_linear_cross_entropy

    with pytest.raises(ValueError, match="whole vocabulary"):
        vocab_parallel_linear_cross_entropy(
            torch.zeros(2, 3, device=device), torch.zeros(5, 3, device=device),
            torch.zeros(2, dtype=torch.long, device=device), vocab_start_index=4)


def _lin_args(**change):
    """(input, weight, target, kwargs) of a valid call, with ``change`` applied."""
    args = dict(input=torch.zeros(2, 3), linear_weight=torch.zeros(5, 3),
                target=torch.zeros(2, dtype=torch.long))
    kwargs = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    return args["input"], args["linear_weight"], args["target"], kwargs


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(linear_weight=torch.zeros(5)), ValueError, r"linear_weight must be 2-D"),
        (dict(linear_weight=torch.zeros(5, 4)), ValueError, "hidden size"),
        (dict(linear_weight=torch.zeros(5, 3, dtype=torch.float64)), TypeError, "must match"),
        (dict(input=torch.zeros(2, 3, dtype=torch.long)), TypeError, "float"),
        (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, "target shape"),
        (dict(target=torch.zeros(2)), TypeError, "class indices"),
        (dict(linear_bias=torch.zeros(4)), ValueError, "linear_bias must be"),
        (dict(weight=torch.zeros(4), vocab_size=5), ValueError, r"per-class weights\) must"),
        (dict(weight=torch.zeros(5, dtype=torch.long)), TypeError, "per-class weights"),
        (dict(target=torch.zeros(2, dtype=torch.long, device="meta")), ValueError, "device"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(memory_budget="1"), TypeError, "memory_budget"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index"),
        (dict(vocab_start_index=-1), ValueError, "vocab_start_index"),
        (dict(vocab_size=7), ValueError, "whole vocabulary"),
        (dict(group=object()), RuntimeError, "init_process_group"),
    ],
    ids=["1d_weight", "hidden_mismatch", "dtype_mismatch", "int_input", "target_shape",
         "float_target", "bias_shape", "class_weight_shape", "int_class_weight",
         "mixed_devices", "bad_reduction", "negative_z_loss", "zero_softcap", "zero_chunk",
         "str_memory_budget", "float_ignore_index", "negative_start", "size_without_group",
         "group_without_init"],
)
def test_vocab_parallel_linear_rejects_bad_arguments(change, error, match):
    from probact_gpu.distributed import vocab_parallel_linear_cross_entropy

    x, w, target, kwargs = _lin_args(**change)
    with pytest.raises(error, match=match):
        vocab_parallel_linear_cross_entropy(x, w, target, **kwargs)


def test_vocab_parallel_linear_tolerances_cover_every_dtype_used():
    used = {c.dtype for cases in LINEAR_CASES.values() for c in cases}
    assert used <= set(TOLERANCES)


@pytest.mark.gpu
def test_vocab_parallel_linear_nccl_world_size_one_large(world_of_one, device):
    """NCCL all_reduces (the two stats reductions and the (N, H) dh reduction) around cuBLAS and
    our kernels at an LM-head-like shape (bf16, 4 token chunks), through the Function; compared
    with the single-process probact_gpu.linear_cross_entropy on the same head."""
    import probact_gpu as pg
    from probact_gpu.distributed import VocabParallelLinearCrossEntropyFunction

    rng = np.random.default_rng(11)
    n, hidden, vocab = 2048, 1024, 50257

    def make(shape, scale):
        values = rng.standard_normal(shape, dtype=np.float32) * scale
        return torch.from_numpy(values).to(device, torch.bfloat16).requires_grad_()

    h, w, b = make((n, hidden), 1.0), make((vocab, hidden), hidden ** -0.5), make((vocab,), 0.1)
    target = torch.from_numpy(rng.integers(0, vocab, n)).to(device)
    target[::9] = -100
    local = dict(reduction="mean", label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    options = CrossEntropyOptions.from_kwargs(**local)
    loss = VocabParallelLinearCrossEntropyFunction.apply(h, w, b, target, None, 0, vocab,
                                                         options, (512, None, None))
    grads = torch.autograd.grad(loss, (h, w, b))
    expected = pg.linear_cross_entropy(h, w, target, linear_bias=b, chunk_size=512, **local)
    expected_grads = torch.autograd.grad(expected, (h, w, b))
    torch.testing.assert_close(loss.float(), expected.float(), atol=0.0, rtol=1e-2)
    for name, ours, theirs in zip(("dh", "dW", "db"), grads, expected_grads, strict=True):
        scale = theirs.float().abs().max().item()
        torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-2 * scale, rtol=2e-2,
                                   msg=lambda m, name=name: f"{name}: {m}")



@pytest.mark.slow
def test_vocab_parallel_cross_entropy_forms_take_dtensors(world_results):
    """vocab_parallel_cross_entropy with DTensor logits (Shard(-1)) and the linear forms with a
    DTensor head (Shard(0), bias too) give every rank the single-process op's loss, and the
    gradients come back as DTensors whose shards, gathered, are the single-process gradients
    (the CE forms once failed with "invalid python storage")."""
    world, results = world_results
    if world != 2:
        pytest.skip("run once, over 2 ranks")
    logits, target, weight, h, head, bias = _dtensor_inputs()
    x = logits.clone().requires_grad_()
    ref = pg.cross_entropy(x, target, weight, reduction="sum", label_smoothing=0.1)
    ref.backward()
    ce = [r[_DTENSOR]["ce"] for r in results]
    for r in ce:
        torch.testing.assert_close(r["loss"], ref.detach())
        assert "Shard(dim=1)" in r["placement"] or "Shard(dim=-1)" in r["placement"]
    torch.testing.assert_close(torch.cat([r["grad"] for r in ce], 1), x.grad)
    hr, w, b = (t.clone().requires_grad_() for t in (h, head, bias))
    ref = pg.linear_cross_entropy(hr, w, target, linear_bias=b, z_loss=1e-3)
    ref.backward()
    lin = [r[_DTENSOR]["linear_ce"] for r in results]
    for r in lin:
        torch.testing.assert_close(r["loss"], ref.detach())
        torch.testing.assert_close(r["dh"], hr.grad)
    torch.testing.assert_close(torch.cat([r["dw"] for r in lin]), w.grad)
    torch.testing.assert_close(torch.cat([r["db"] for r in lin]), b.grad)
    hr, w = h.clone().requires_grad_(), head.clone().requires_grad_()
    logp = pg.linear_token_log_probs(hr, w, target.clamp(min=0), temperature=0.7)
    logp.sum().backward()
    tlp = [r[_DTENSOR]["linear_tlp"] for r in results]
    for r in tlp:
        torch.testing.assert_close(r["logp"], logp.detach())
        torch.testing.assert_close(r["dh"], hr.grad)
    torch.testing.assert_close(torch.cat([r["dw"] for r in tlp]), w.grad)


def test_vocab_parallel_tensor_options_get_the_whole_gradient(world_results):
    """Over 2 ranks: a tensor logit_scale / logit_divisor / temperature that requires grad gets,
    on every rank, the gradient of the torch composition on the whole logits (each rank's
    shard holds only its part of it; the bias shards' parts too)."""
    world, results = world_results
    if world != 2:
        pytest.skip("run by the 2-rank spawn")
    F = torch.nn.functional
    logits, target, h, head, bias, values = _tensor_option_inputs()
    s, d, temp = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values)
    x = logits.clone().requires_grad_()
    z = x * s / d / temp
    safe = target.clamp(min=0)
    logp = torch.log_softmax(x * s, -1).gather(-1, safe[:, None])
    loss = F.cross_entropy(z, target) + logp.sum()
    loss.backward()
    for rank, (start, size) in enumerate(_TENSOR_LAYOUT):
        got = results[rank][_TENSOR_OPTIONS]["ce"]
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["dx"], x.grad[:, start:start + size], rtol=1e-9,
                                   atol=1e-12)
        for key, ref in (("ds", s.grad), ("dd", d.grad), ("dt", temp.grad)):
            torch.testing.assert_close(got[key], ref, rtol=1e-9, atol=1e-12, msg=key)
    s, d = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values[:2])
    hr, b = h.clone().requires_grad_(), bias.clone().requires_grad_()
    u = (hr @ head.T + b) * s / d
    loss = F.cross_entropy(3.0 * torch.tanh(u / 3.0), target)
    loss.backward()
    for rank, (start, size) in enumerate(_TENSOR_LAYOUT):
        got = results[rank][_TENSOR_OPTIONS]["linear_ce"]
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["dh"], hr.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["db"], b.grad[start:start + size], rtol=1e-9, atol=1e-12)
        for key, ref in (("ds", s.grad), ("dd", d.grad)):
            torch.testing.assert_close(got[key], ref, rtol=1e-9, atol=1e-12, msg=key)

"""Vocab-parallel token log-probs (logits, DTensor logits, fused linear) over torch.distributed.

Multi-rank runs spawn fresh interpreters that each run this file's ``run_rank`` (tests/_gloo.py,
through conftest.py's ``gloo_spawn``, as tests/test_distributed.py): a gloo process group on
127.0.0.1, TRITON_INTERPRET=1 set before anything imports triton, a hard timeout so a hang fails
instead of blocking. One spawn per world size (2 and 4) runs every case of that size and writes
each rank's outputs, gradients and launches to a file; the parent compares them with the NumPy
float64 reference and with the single-process ``token_log_probs`` on the gathered logits.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from probact_gpu import reference_lm_head as ref
from probact_gpu.distributed import (
    VocabParallelTokenLogProbsFunction,
    vocab_parallel_linear_token_log_probs,
    vocab_parallel_token_log_probs,
)
from probact_gpu.ops.linear_token_log_probs import linear_token_log_probs
from probact_gpu.ops.token_log_probs import TokenLogProbs, token_log_probs
from probact_gpu.options import HeadTransform
from probact_gpu.testing import (
    assert_close_to_reference,
    poison_outputs,
    record_launches,
    to_numpy64,
)
from probact_gpu.tiling import RowConfig

SPAWN_TIMEOUT_S = 240  # a whole spawn: start-up, every case, teardown
N_ROWS = 6
IGNORE = -100


def _in_rank_order(*sizes: int) -> tuple[tuple[int, int], ...]:
    starts = np.cumsum((0,) + sizes[:-1])
    return tuple((int(s), v) for s, v in zip(starts, sizes, strict=True))


@dataclass(frozen=True)
class Case:
    """One vocab-parallel call. ``layout``: (start, size) per rank; ``explicit`` passes
    vocab_start_index (and, with ``with_size``, vocab_size); ``dtensor`` passes the logits as a
    DTensor sharded on the class dim (torch.chunk's layout, ``layout`` ignored); ``error``:
    every rank must raise a ValueError containing it."""

    name: str
    layout: tuple[tuple[int, int], ...]
    why: str
    dtype: torch.dtype = torch.float32
    options: dict = field(default_factory=dict)
    explicit: bool = False
    with_size: bool = True
    dtensor: bool = False
    config: RowConfig | None = None
    error: str = ""

    @property
    def vocab(self) -> int:
        return sum(size for _, size in self.layout)


CASES: dict[int, tuple[Case, ...]] = {
    2: (
        Case("uneven", _in_rank_order(20, 17), "V = 37 not divisible by 2; no transform"),
        Case("softcap_temperature_bf16_split3", _in_rank_order(24, 13),
             "bf16, softcap + temperature, 3 chunks per rank (the 13-wide shard's third is "
             "empty)", dtype=torch.bfloat16, options=dict(softcap=4.0, temperature=0.7),
             config=RowConfig("split", 8, 4, n_splits=3)),
        Case("explicit_reversed", ((17, 20), (0, 17)),
             "rank 0 holds the upper classes (vocab_start_index and vocab_size given)",
             explicit=True, options=dict(logit_scale=1.5, temperature=2.0)),
        Case("dtensor", _in_rank_order(19, 18), "DTensor logits, Shard(-1) of 37 classes",
             dtensor=True, options=dict(temperature=0.5)),
    ),
    4: (
        Case("uneven4_all_options", _in_rank_order(5, 20, 1, 11),
             "4 uneven shards, one of a single class; every transform",
             options=dict(logit_scale=1.3, logit_divisor=0.8, softcap=3.0, temperature=1.2)),
        Case("empty_shard_fp64", _in_rank_order(0, 13, 12, 12),
             "an empty shard; fp64; start and size given: no layout collective",
             dtype=torch.float64, explicit=True),
        Case("dtensor4", _in_rank_order(10, 10, 10, 7), "DTensor logits over 4 ranks",
             dtensor=True),
        Case("overlapping_starts", ((0, 10), (5, 9), (14, 9), (23, 9)),
             "starts given (not the size), rank 1's shard overlaps rank 0's: the layout "
             "check raises on every rank", explicit=True, with_size=False, error="tile"),
    ),
}

# (name, (start, size) of the head's rows per rank, hidden size, chunk_size, bias, why)
LINEAR_CASES: dict[int, tuple[tuple, ...]] = {
    2: (("linear2", _in_rank_order(20, 17), 8, 4, True, "uneven head, bias, 2 token chunks"),),
    4: (("linear4", _in_rank_order(9, 0, 15, 13), 6, None, False,
         "an empty shard of the head, one chunk"),),
}


def _inputs(name: str, vocab: int, dtype: torch.dtype):
    """Full logits (rounded to the dtype), targets with an ignored row, and the upstream
    gradients of logp and entropy — the same in every process (seeded by the case's name)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    full = torch.from_numpy(rng.standard_normal((N_ROWS, vocab)) * 2.0).to(dtype)
    target = torch.from_numpy(rng.integers(0, vocab, N_ROWS))
    target[1] = IGNORE
    out = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.from_numpy(rng.standard_normal(N_ROWS)).to(out)
    gh = torch.from_numpy(rng.standard_normal(N_ROWS)).to(out)
    return full, target, g, gh


def _linear_inputs(name: str, vocab: int, hidden: int):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    h = torch.from_numpy(rng.standard_normal((2, N_ROWS // 2, hidden))).float()
    w = torch.from_numpy(rng.standard_normal((vocab, hidden)) * 0.5).float()
    b = torch.from_numpy(rng.standard_normal(vocab)).float()
    target = torch.from_numpy(rng.integers(0, vocab, (2, N_ROWS // 2)))
    target[0, 1] = IGNORE
    g = torch.from_numpy(rng.standard_normal((2, N_ROWS // 2))).float()
    gh = torch.from_numpy(rng.standard_normal((2, N_ROWS // 2))).float()
    return h, w, b, target, g, gh


# --------------------------------------------------------------------------- spawned ranks


def _run_case(case: Case, rank: int, world: int) -> dict:
    full, target, g, gh = _inputs(case.name, case.vocab, case.dtype)
    kwargs = dict(case.options, config=case.config, return_entropy=True, return_lse=True,
                  return_argmax=True)
    if case.dtensor:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        x = distribute_tensor(full, mesh, [Shard(-1)]).requires_grad_()
    else:
        start, size = case.layout[rank]
        x = full[:, start:start + size].clone().requires_grad_()
        if case.explicit:
            kwargs["vocab_start_index"] = start
            if case.with_size:
                kwargs["vocab_size"] = case.vocab
    try:
        with poison_outputs(), record_launches() as log:
            out = vocab_parallel_token_log_probs(x, target, **kwargs)
            n_fwd = len(log)
            ((out.logprobs * g).sum() + (out.entropy * gh).sum()).backward()
    except ValueError as e:
        if not case.error:
            raise
        return {"error": str(e)}
    grad = x.grad.to_local() if case.dtensor else x.grad
    return {"logp": out.logprobs, "entropy": out.entropy, "lse": out.lse, "argmax": out.argmax,
            "grad": grad, "fwd": [launch.kernel for launch in log[:n_fwd]],
            "bwd": [launch.kernel for launch in log[n_fwd:]]}


def _run_linear_case(spec, rank: int) -> dict:
    name, layout, hidden, chunk_size, bias, _ = spec
    vocab = sum(size for _, size in layout)
    h, w, b, target, g, gh = _linear_inputs(name, vocab, hidden)
    start, size = layout[rank]
    hr = h.clone().requires_grad_()
    wr = w[start:start + size].clone().requires_grad_()
    br = b[start:start + size].clone().requires_grad_() if bias else None
    with poison_outputs():
        out = vocab_parallel_linear_token_log_probs(
            hr, wr, target, linear_bias=br, chunk_size=chunk_size, return_entropy=True,
            return_argmax=True, softcap=5.0, temperature=0.9)
        ((out.logprobs * g).sum() + (out.entropy * gh).sum()).backward()
    return {"logp": out.logprobs, "entropy": out.entropy, "argmax": out.argmax,
            "dh": hr.grad, "dw": wr.grad, "db": None if br is None else br.grad}


def run_rank(rank: int, world: int) -> dict:
    """Every case of this world size on this rank (a spawned rank: tests/_gloo.py)."""
    results = {}
    for case in CASES[world]:
        results[case.name] = _run_case(case, rank, world)
    for spec in LINEAR_CASES[world]:
        results[spec[0]] = _run_linear_case(spec, rank)
    return results


@pytest.fixture(scope="module", params=sorted(CASES))
def world_results(request, tmp_path_factory, gloo_spawn):
    world = request.param
    return world, gloo_spawn(__file__, world, tmp_path_factory.mktemp(f"lm_head_world{world}"),
                             SPAWN_TIMEOUT_S)


# --------------------------------------------------------------------------- multi-rank tests


def _out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dtensor_layout(vocab: int, world: int):
    chunk = -(-vocab // world)
    return tuple((min(r * chunk, vocab), max(0, min(chunk, vocab - r * chunk)))
                 for r in range(world))


def _expected(case: Case):
    full, target, g, gh = _inputs(case.name, case.vocab, case.dtype)
    return full, target, ref.token_log_probs(to_numpy64(full), to_numpy64(target),
                                             grad_logp=to_numpy64(g), grad_entropy=to_numpy64(gh),
                                             **case.options)


def _valid(world):
    return [c for c in CASES[world] if not c.error]


@pytest.mark.slow
def test_vocab_parallel_token_log_probs_match_reference(world_results):
    """Every rank's outputs, and the rank gradients concatenated in vocabulary order, against
    the float64 reference on the gathered logits."""
    world, results = world_results
    for case in _valid(world):
        _, _, expected = _expected(case)
        out = _out_dtype(case.dtype)
        layout = _dtensor_layout(case.vocab, world) if case.dtensor else case.layout
        for res in results:
            r = res[case.name]
            for name in ("logp", "entropy", "lse"):
                assert_close_to_reference(r[name], expected[name], out, f"{case.name} {name}")
            np.testing.assert_array_equal(r["argmax"].numpy(), expected["argmax"])
        grad = np.zeros((N_ROWS, case.vocab))
        for (start, size), res in zip(layout, results, strict=True):
            grad[:, start:start + size] = to_numpy64(res[case.name]["grad"])
        assert_close_to_reference(grad, expected["dx"], case.dtype, f"{case.name} dlogits")


@pytest.mark.slow
def test_vocab_parallel_token_log_probs_identical_on_every_rank_and_local_op(world_results):
    world, results = world_results
    for case in _valid(world):
        full, target, _ = _expected(case)
        local = token_log_probs(full, target, return_entropy=True, return_lse=True,
                                return_argmax=True, **case.options)
        out = _out_dtype(case.dtype)
        for res in results[1:]:
            for name in ("logp", "entropy", "lse", "argmax"):
                torch.testing.assert_close(res[case.name][name], results[0][case.name][name],
                                           rtol=0, atol=0)
        for name, value in zip(("logp", "entropy", "lse"), local[:3], strict=True):
            assert_close_to_reference(results[0][case.name][name], to_numpy64(value), out, name)
        torch.testing.assert_close(results[0][case.name]["argmax"], local.argmax)


@pytest.mark.slow
def test_vocab_parallel_token_log_probs_launches(world_results):
    """Forward: the partial-statistics kernel only; backward: the local gradient kernel only;
    a rank with an empty shard launches nothing."""
    world, results = world_results
    for case in _valid(world):
        layout = _dtensor_layout(case.vocab, world) if case.dtensor else case.layout
        for (_, size), res in zip(layout, results, strict=True):
            r = res[case.name]
            if size == 0:
                assert r["fwd"] == [] and r["bwd"] == []
                continue
            assert set(r["fwd"]) == {"token_log_probs_partial_kernel"}
            assert r["bwd"] == ["token_log_probs_bwd_kernel"]


@pytest.mark.slow
def test_vocab_parallel_token_log_probs_bad_layout_raises_on_every_rank(world_results):
    world, results = world_results
    for case in CASES[world]:
        if case.error:
            for res in results:
                assert case.error in res[case.name]["error"]


@pytest.mark.slow
def test_vocab_parallel_linear_token_log_probs_match_reference(world_results):
    """Outputs and dh identical on every rank and equal to the reference; the shards' dW and db
    concatenated in vocabulary order equal the reference's."""
    world, results = world_results
    for name, layout, hidden, _, bias, _ in LINEAR_CASES[world]:
        vocab = sum(size for _, size in layout)
        h, w, b, target, g, gh = _linear_inputs(name, vocab, hidden)
        logits = to_numpy64(h) @ to_numpy64(w).T + (to_numpy64(b) if bias else 0.0)
        expected = ref.token_log_probs(logits, to_numpy64(target), grad_logp=to_numpy64(g),
                                       grad_entropy=to_numpy64(gh), softcap=5.0,
                                       temperature=0.9)
        dz = expected["dx"].reshape(-1, vocab)
        h2 = to_numpy64(h).reshape(-1, hidden)
        dw = np.zeros((vocab, hidden))
        db = np.zeros(vocab)
        for rank, res in enumerate(results):
            r = res[name]
            for key in ("logp", "entropy"):
                assert_close_to_reference(r[key], expected[key], torch.float32, f"{name} {key}")
            np.testing.assert_array_equal(r["argmax"].numpy(), expected["argmax"])
            assert_close_to_reference(r["dh"], (dz @ to_numpy64(w)).reshape(h.shape),
                                      torch.float32, f"{name} dh")
            torch.testing.assert_close(r["dh"], results[0][name]["dh"], rtol=0, atol=0)
            start, size = layout[rank]
            dw[start:start + size] = to_numpy64(r["dw"])
            if bias:
                db[start:start + size] = to_numpy64(r["db"])
        assert_close_to_reference(dw, dz.T @ h2, torch.float32, f"{name} dW")
        if bias:
            assert_close_to_reference(db, dz.sum(axis=0), torch.float32, f"{name} db")


# --------------------------------------------------------------------------- in-process


def test_vocab_parallel_token_log_probs_without_group_is_the_local_op(rng, device):
    x = torch.from_numpy(rng.standard_normal((4, 11))).float().to(device)
    t = torch.tensor([3, IGNORE, 10, 0], device=device)
    out = vocab_parallel_token_log_probs(x, t, temperature=0.8, return_entropy=True)
    local = token_log_probs(x, t, temperature=0.8, return_entropy=True)
    assert isinstance(out, TokenLogProbs)
    torch.testing.assert_close(out.logprobs, local.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(out.entropy, local.entropy, rtol=0, atol=0)
    h = torch.from_numpy(rng.standard_normal((4, 5))).float().to(device)
    w = torch.from_numpy(rng.standard_normal((11, 5))).float().to(device)
    torch.testing.assert_close(vocab_parallel_linear_token_log_probs(h, w, t),
                               linear_token_log_probs(h, w, t), rtol=0, atol=0)


def test_vocab_parallel_token_log_probs_world_size_one(world_of_one, rng, device):
    """The public function takes the local op; the Function runs the partials and collectives
    over the group of one, and both match the reference."""
    x64 = rng.standard_normal((5, 23)) * 2
    x = torch.from_numpy(x64).float().to(device).requires_grad_()
    t = torch.tensor([22, 0, IGNORE, 13, 5], device=device)
    g = torch.from_numpy(rng.standard_normal(5)).float().to(device)
    expected = ref.token_log_probs(x64.astype(np.float32).astype(np.float64), to_numpy64(t),
                                   softcap=3.0, grad_logp=to_numpy64(g),
                                   grad_entropy=np.ones(5))
    with record_launches() as log:
        out = vocab_parallel_token_log_probs(x, t, softcap=3.0, return_entropy=True)
    assert "token_log_probs_partial_kernel" not in [launch.kernel for launch in log]
    logp, entropy, _, _ = VocabParallelTokenLogProbsFunction.apply(
        x, t, None, 0, 23, IGNORE, HeadTransform(softcap=3.0), True, False, None, True)
    for value in (out.logprobs, logp):
        assert_close_to_reference(value, expected["logp"], torch.float32, "logp")
    assert_close_to_reference(entropy, expected["entropy"], torch.float32, "entropy")
    ((logp * g).sum() + entropy.sum()).backward()
    assert_close_to_reference(x.grad, expected["dx"], torch.float32, "dlogits")


def test_vocab_parallel_token_log_probs_world_size_one_rejects_partial_shard(world_of_one,
                                                                             device):
    x = torch.zeros(2, 5, device=device)
    t = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="whole vocabulary"):
        vocab_parallel_token_log_probs(x, t, vocab_start_index=5, vocab_size=10)


@pytest.mark.parametrize("change,error,match", [
    (dict(target=torch.zeros(3, dtype=torch.int64)), ValueError, "target must have shape"),
    (dict(input=torch.zeros(2, 3, 4)), ValueError, r"\(N, V_local\)"),
    (dict(vocab_start_index=-1), ValueError, "vocab_start_index"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(group=object()), RuntimeError, "init_process_group"),
])
def test_vocab_parallel_token_log_probs_rejects_bad_arguments(change, error, match, device):
    args = dict(input=torch.zeros(2, 4), target=torch.zeros(2, dtype=torch.int64))
    args.update(change)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        vocab_parallel_token_log_probs(args.pop("input"), args.pop("target"), **args)



def test_vocab_parallel_token_log_probs_nan_argmax_and_inf_lse(world_of_one, device):
    """Through the collectives (the Function over a group of one, two chunks a row): argmax is
    the first NaN's index (the all_reduce(MIN) of candidates takes it) and lse +inf on a row
    with a +inf logit, as torch.argmax and torch.logsumexp."""
    nan, inf = float("nan"), float("inf")
    x = torch.randn(5, 23, generator=torch.Generator().manual_seed(5)).to(device)
    x[0, 20], x[0, 2] = nan, 40.0
    x[1, 4], x[1, 15] = nan, nan
    x[2, 9] = inf
    x[3], x[3, 17] = -inf, inf
    t = torch.tensor([0, 1, 2, 17, 3], device=device)
    cfg = RowConfig("split", 16, 4, n_splits=2)
    _, _, lse, arg = VocabParallelTokenLogProbsFunction.apply(
        x, t, None, 0, 23, IGNORE, HeadTransform(), False, True, cfg, False)
    torch.testing.assert_close(arg, torch.argmax(x, -1), rtol=0, atol=0)
    torch.testing.assert_close(lse, torch.logsumexp(x.double(), -1).float(), equal_nan=True)

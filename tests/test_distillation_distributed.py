"""Vocab-parallel distillation (logits, DTensor logits, fused linear heads) over torch.distributed.

One spawn of 2 gloo ranks (tests/_gloo.py, through conftest.py's ``gloo_spawn``) runs every case
and writes each rank's loss and gradients; the parent compares them with the single-process
``distillation_loss`` / ``linear_distillation_loss`` on the gathered tensors (themselves checked
against float64 in test_distillation.py): the same loss on every rank, the rank gradients
concatenated in vocabulary order equal to the local op's.
"""

from __future__ import annotations

import pytest
import torch

from probact_gpu.distributed import (
    vocab_parallel_distillation_loss,
    vocab_parallel_linear_distillation_loss,
)
from probact_gpu.ops.distillation import distillation_loss
from probact_gpu.ops.linear_distillation import linear_distillation_loss
from probact_gpu.testing import poison_outputs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SPAWN_TIMEOUT_S = 240
WORLD = 2
LAYOUT = ((0, 20), (20, 17))  # uneven shards of 37 classes
N, V = 5, 37
# (name, keywords): a divergence each, the hard term (global class ids), each head's transform
CASES = [
    ("kl_hard", dict(divergence="kl", hard_weight=0.5, temperature=1.3, student_softcap=4.0)),
    ("jsd_sum", dict(divergence="jsd", beta=0.3, teacher_logit_scale=1.2, reduction="sum",
                     normalizer=3.0)),
]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g) * 2
    t = torch.randn(N, V, generator=g) * 2
    target = torch.randint(0, V, (N,), generator=g)
    target[1] = -100
    return s, t, target


def _linear_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, 8, generator=g), torch.randn(V, 8, generator=g) * 0.4,
            torch.randn(V, generator=g), torch.randn(N, 12, generator=g),
            torch.randn(V, 12, generator=g) * 0.3)


def run_rank(rank: int, world: int) -> dict:
    """Every case on this rank (a spawned rank: tests/_gloo.py)."""
    start, size = LAYOUT[rank]
    s, t, target = _inputs()
    out = {}
    with poison_outputs():
        for name, kw in CASES:
            sr = s[:, start:start + size].clone().requires_grad_()
            loss = vocab_parallel_distillation_loss(sr, t[:, start:start + size], target, **kw)
            loss.backward()
            out[name] = (loss.detach(), sr.grad)
        # DTensor logits: torch.chunk's layout (19, 18), no layout collective
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        sd = distribute_tensor(s, mesh, [Shard(-1)]).requires_grad_()
        td = distribute_tensor(t, mesh, [Shard(-1)])
        loss = vocab_parallel_distillation_loss(sd, td, target, divergence="reverse_kl")
        loss.backward()
        out["dtensor"] = (loss.detach(), sd.grad.to_local())
        # fused linear heads: JSD (its terms' second pass), a student bias, 2 chunks
        hs, ws, bs, ht, wt = _linear_inputs()
        hr = hs.clone().requires_grad_()
        wr = ws[start:start + size].clone().requires_grad_()
        br = bs[start:start + size].clone().requires_grad_()
        loss = vocab_parallel_linear_distillation_loss(
            hr, wr, ht, wt[start:start + size], target, student_bias=br, chunk_size=3,
            divergence="jsd", beta=0.5, temperature=0.8)
        loss.backward()
        out["linear"] = (loss.detach(), hr.grad, wr.grad, br.grad)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory, gloo_spawn):
    return gloo_spawn(__file__, WORLD, tmp_path_factory.mktemp("distill_world2"),
                      SPAWN_TIMEOUT_S)


def _local(kw, s, t, target):
    sr = s.clone().requires_grad_()
    loss = distillation_loss(sr, t, target, **kw)
    loss.backward()
    return loss.detach(), sr.grad


@pytest.mark.slow
def test_vocab_parallel_distillation_matches_local_op(results):
    """Each divergence (the hard term's target on either rank), DTensor logits: every rank's
    loss equals the local op's on the gathered logits, and the rank gradients concatenated."""
    s, t, target = _inputs()
    for name, kw in [*CASES, ("dtensor", dict(divergence="reverse_kl"))]:
        loss, grad = _local(kw, s, t, target)
        for rank in range(WORLD):
            torch.testing.assert_close(results[rank][name][0], loss, rtol=1e-6, atol=1e-7,
                                       msg=f"{name} rank {rank}")
        chunks = [results[r][name][1] for r in range(WORLD)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), grad, rtol=1e-5, atol=1e-7,
                                   msg=name)


@pytest.mark.slow
def test_vocab_parallel_linear_distillation_matches_local_op(results):
    hs, ws, bs, ht, wt = _linear_inputs()
    _, _, target = _inputs()
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    loss = linear_distillation_loss(leaves[0], leaves[1], ht, wt, target,
                                    student_bias=leaves[2], chunk_size=3, divergence="jsd",
                                    beta=0.5, temperature=0.8)
    loss.backward()
    for rank in range(WORLD):
        got, dh, _, _ = results[rank]["linear"]
        torch.testing.assert_close(got, loss.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(dh, leaves[0].grad, rtol=1e-5, atol=1e-6)  # all-reduced
    torch.testing.assert_close(torch.cat([results[r]["linear"][2] for r in range(WORLD)]),
                               leaves[1].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([results[r]["linear"][3] for r in range(WORLD)]),
                               leaves[2].grad, rtol=1e-5, atol=1e-6)


def test_vocab_parallel_distillation_without_group_is_the_local_op(device):
    s, t, target = _inputs()
    s, t, target = s.to(device), t.to(device), target.to(device)
    torch.testing.assert_close(
        vocab_parallel_distillation_loss(s, t, target, divergence="jsd"),
        distillation_loss(s, t, target, divergence="jsd"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shards of the same classes"):
        vocab_parallel_distillation_loss(s, t[:, :30], target)
    with pytest.raises(ValueError, match="shared_vocab has no vocab-parallel form"):
        vocab_parallel_linear_distillation_loss(s, s[:, :1].new_ones(V, V), s, s,
                                                shared_vocab=3)

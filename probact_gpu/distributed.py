"""Vocab-parallel cross-entropy: the loss of logits split along the vocabulary over the ranks of
a ``torch.distributed`` process group (tensor-parallel LM heads), without gathering the logits.

Rank ``r`` holds ``x_r`` (N, V_r), the columns of global classes ``[s_r, s_r + V_r)`` of the
same N rows; every rank holds the same targets (global class ids). With ``z`` the transformed
logits (softcap), the loss needs per row only

    M   = max_r m_r                                  m_r = max z over rank r's columns
    S   = Σ_r Σ_c∈r exp(z_c − M)                      lse = M + log S
    z_t = the target's logit (on exactly one rank; the others contribute 0)
    Σz  = Σ_r Σ_c∈r z_c                               (label smoothing only)

Forward, on every rank:

1. our split-row statistics kernel on the local shard (``cross_entropy_partial_stats`` with
   ``vocab_start = s_r``): per (row, chunk) partial max, Σexp, z_t, Σz;
2. ``all_reduce(MAX)`` of the local row max (N floats), then the local Σexp rescaled to the
   global max, z_t and Σz packed as (N, 3) and ``all_reduce(SUM)`` once;
3. our combine kernel on the global (N, 1, 4) statistics (``cross_entropy_combine`` with the
   global class count): per-row loss and lse, identical on every rank; then the reduction.

Backward is local: ``dx_r = g · (p − onehot(t) …)`` over rank r's columns, from the saved global
lse (``cross_entropy_grad`` with ``vocab_start = s_r``). No communication.

Communication: 4·N floats per rank and call (fp32; fp64 for fp64 logits) in two all_reduces —
never the logits (N·V). A ring all_reduce moves about twice its payload per rank, so ~32·N bytes
for fp32: for N = 8192 tokens, 256 KiB, against 2 GiB for all-gathering 128256-class bf16 logits.
The shard layout costs one more, tiny, collective unless both ``vocab_start_index`` and
``vocab_size`` are given (see :func:`vocab_parallel_cross_entropy`).

No host sync in forward or backward besides that layout exchange, which reads 4 integers per
rank on the host (``.tolist()``; a device sync on NCCL). Pass ``vocab_start_index`` and
``vocab_size`` in a training loop to skip it.
"""

from __future__ import annotations

import torch

from ._runtime import check_runnable, check_same_device
from .ops.cross_entropy import (
    _INT_DTYPES,
    _check_options,
    _stats_dtype,
    cross_entropy,
    cross_entropy_combine,
    cross_entropy_grad,
    cross_entropy_partial_stats,
    cross_entropy_total_weight,
)
from .tiling import RowConfig

__all__ = ["VocabParallelCrossEntropyFunction", "vocab_parallel_cross_entropy"]

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _dist():
    """``torch.distributed`` when it is built in (it is not on every platform), else None."""
    import torch.distributed as dist

    return dist if dist.is_available() else None


def _group_world(group) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without an initialized default process group."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        if group is not None:
            raise RuntimeError("group was given but torch.distributed has no initialized process "
                               "group: call torch.distributed.init_process_group first")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("this process is not a member of `group`: every rank that calls "
                           "vocab_parallel_cross_entropy must belong to the group")
    return rank, dist.get_world_size(group)


def _layout(input, group, rank, world, vocab_start_index, vocab_size) -> tuple[int, int]:
    """(vocab_start, vocab_size) of this rank's shard. Exchanges (V_local, N, start, dtype) with
    one all_gather of 4 int64 per rank and checks them, identically on every rank (so every rank
    raises the same error, and none is left waiting in a later collective)."""
    import torch.distributed as dist

    n_rows, v_local = input.shape
    if vocab_start_index is not None and vocab_size is not None:
        if not 0 <= vocab_start_index <= vocab_size - v_local:
            raise ValueError(
                f"vocab_start_index={vocab_start_index} with {v_local} local classes does not "
                f"fit in vocab_size={vocab_size}")
        return vocab_start_index, vocab_size
    start = -1 if vocab_start_index is None else vocab_start_index
    mine = torch.tensor([v_local, n_rows, start, _DTYPE_CODES[input.dtype]], dtype=torch.int64,
                        device=input.device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    meta = torch.stack(gathered).tolist()  # the one host read: world × 4 integers
    sizes = [m[0] for m in meta]
    rows = {m[1] for m in meta}
    if len(rows) != 1:
        raise ValueError(f"every rank must hold the same rows: got N = {[m[1] for m in meta]} "
                         "rows per rank")
    if len({m[3] for m in meta}) != 1:
        names = {code: str(dt) for dt, code in _DTYPE_CODES.items()}
        raise ValueError(f"every rank's shard must have the same dtype, got "
                         f"{[names[m[3]] for m in meta]}")
    total = sum(sizes)
    if vocab_size is not None and vocab_size != total:
        raise ValueError(f"vocab_size={vocab_size} but the shards hold {total} classes "
                         f"({sizes} per rank)")
    starts = [m[2] for m in meta]
    if all(s == -1 for s in starts):
        return sum(sizes[:rank]), total
    if any(s == -1 for s in starts):
        raise ValueError("vocab_start_index must be given on every rank or on none, got "
                         f"{[None if s == -1 else s for s in starts]}")
    covered = 0
    for s, v in sorted(zip(starts, sizes, strict=True)):
        if s != covered:
            raise ValueError(f"the shards must tile [0, {total}) exactly: got (start, size) per "
                             f"rank {list(zip(starts, sizes, strict=True))}")
        covered += v
    return starts[rank], total


def _check_inputs(input, target, reduction, label_smoothing, z_loss, softcap) -> None:
    _check_options(input, None, None, reduction, label_smoothing, z_loss, softcap, 1.0)
    if input.ndim != 2:
        raise ValueError(f"input must be this rank's (N, V_local) logits, got shape "
                         f"{tuple(input.shape)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in _INT_DTYPES or tuple(target.shape) != (input.shape[0],):
        raise ValueError(f"target must hold global class ids as an int32/int64 tensor of shape "
                         f"({input.shape[0]},), got dtype={target.dtype}, "
                         f"shape={tuple(target.shape)}")
    check_same_device(input=input, target=target)


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """The split path with its collectives, for any group size (world size 1 included: the GPU
    test runs NCCL through it on one device). :func:`vocab_parallel_cross_entropy` validates
    its arguments and sends world size 1 to the local op instead."""

    @staticmethod
    def forward(ctx, input, target, group, vocab_start, vocab_size, ignore_index, reduction,
                label_smoothing, z_loss, softcap, config):
        import torch.distributed as dist

        sdt = _stats_dtype(input)
        target = target.contiguous()
        # 1. Local partials: (N, S, 4) = (max z, Σ exp(z − max), z_t or 0, Σ z) per chunk.
        if input.shape[1] == 0:  # an empty shard contributes nothing (and launches nothing)
            stats = torch.zeros((input.shape[0], 1, 4), dtype=sdt, device=input.device)
            stats[..., 0] = float("-inf")
        else:
            stats = cross_entropy_partial_stats(
                input, target, vocab_start=vocab_start, label_smoothing=label_smoothing,
                softcap=softcap, config=config)
        # 2. Global max, then the sums rescaled to it: two all_reduces of N and 3·N floats.
        row_max = stats[..., 0].amax(dim=1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shift = torch.where(row_max == float("-inf"), 0.0, row_max)  # all −inf: exp(−inf) = 0
        sums = torch.stack(
            [(stats[..., 1] * torch.exp(stats[..., 0] - shift[:, None])).sum(dim=1),
             stats[..., 2].sum(dim=1), stats[..., 3].sum(dim=1)], dim=1)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        # 3. Loss and lse from the global statistics (one "split" per row), same on every rank.
        merged = torch.cat([row_max[:, None], sums], dim=1)[:, None, :]
        rows, lse = cross_entropy_combine(
            merged, target, vocab_size, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss)
        divisor = None
        if reduction == "none":
            loss = rows.to(input.dtype)
        elif reduction == "sum":
            loss = rows.sum().to(input.dtype)
        else:
            divisor = cross_entropy_total_weight(target, vocab_size, ignore_index=ignore_index,
                                                 dtype=sdt)
            loss = (rows.sum() / divisor).to(input.dtype)
        ctx.save_for_backward(input, target, lse, divisor)
        ctx.opts = dict(vocab_start=vocab_start, n_classes=vocab_size, ignore_index=ignore_index,
                        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                        config=config)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        input, target, lse, divisor = ctx.saved_tensors
        dx = cross_entropy_grad(input, target, lse, grad_loss, divisor=divisor, **ctx.opts)
        return dx, None, None, None, None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    config: RowConfig | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits split along the vocabulary over the ranks of ``group`` (default:
    the world). Every rank calls it with its shard and gets the same loss: the value of
    ``probact_gpu.cross_entropy`` on the logits concatenated in vocabulary order, with the same
    ``ignore_index``, ``reduction``, ``label_smoothing`` (torch's semantics), ``z_loss``
    (``z_loss · lse²`` per non-ignored row) and ``softcap`` (``softcap · tanh(x / softcap)``
    before the softmax).

    - ``input``: this rank's (N, V_local) logits, any strides, any float dtype (the same on
      every rank); shards may be uneven (V not divisible by the world size) or empty.
    - ``target``: (N,) int32/int64 *global* class ids, the same on every rank.
    - ``vocab_start_index``: the first global class of this shard. None: shards are in rank
      order, and the starts are the prefix sums of the V_local sizes, learnt with one
      all_gather of 4 integers per rank (read on the host: a device sync on NCCL).
    - ``vocab_size``: the global class count. When it and ``vocab_start_index`` are both given
      no layout collective runs at all (nothing is checked across ranks either); otherwise the
      layout exchange also checks that every rank has the same N and dtype and that the shards
      tile ``[0, V)``, raising the same ValueError on every rank.
    - ``config``: a launch override for the statistics and gradient kernels (tests, tuning).

    Communication per call: two all_reduces of N and 3·N floats (fp32, fp64 for fp64 logits):
    O(N) per rank, independent of V. The backward communicates nothing: it returns the gradient
    of this rank's shard only (the gradients of the other shards live on their ranks).

    Without an initialized process group, or with a group of one rank, this is the local op
    ``probact_gpu.cross_entropy(input, target, ...)`` (vocab_start_index must then be 0 or None).
    """
    _check_inputs(input, target, reduction, label_smoothing, z_loss, softcap)
    for name, value in (("vocab_start_index", vocab_start_index), ("vocab_size", vocab_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 0):
            raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")
    rank, world = _group_world(group)
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    softcap = None if softcap is None else float(softcap)
    if world == 1:
        if vocab_start_index not in (None, 0) or vocab_size not in (None, input.shape[1]):
            raise ValueError(
                f"with one rank the shard is the whole vocabulary ({input.shape[1]} classes), "
                f"got vocab_start_index={vocab_start_index}, vocab_size={vocab_size}")
        return cross_entropy(input, target, ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    import torch.distributed as dist

    backend = dist.get_backend(group)
    if backend == "nccl" and input.device.type != "cuda":
        raise ValueError(f"the process group uses NCCL, which needs CUDA tensors; input is on "
                         f"{input.device}")
    if input.numel() > 0:
        check_runnable(input)
    vocab_start, n_classes = _layout(input, group, rank, world, vocab_start_index, vocab_size)
    return VocabParallelCrossEntropyFunction.apply(
        input, target, group, vocab_start, n_classes, int(ignore_index), reduction,
        label_smoothing, z_loss, softcap, config)

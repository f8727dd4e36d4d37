"""Host side of the batch-invariant reduction (``kernels/_invariant.py``): the tile statistics of
given logits, the exact merge against a row max, the collectives that make a vocabulary split
over ranks give the single-device bits, and the rows' outputs from the exact sums. Shared by
``token_log_probs``, ``cross_entropy``, the fused head (``ops.fused_head``) and their
vocab-parallel forms when ``batch_invariant=True`` (docs/rl.md). No host sync anywhere.

Stable surface:

``invariant_tile_stats(logits, target, *, vocab_start=0, transform, compute_entropy,
compute_argmax, dim=-1) -> TileStates``
    Per (row, tile of ``INVARIANT_TILE`` classes) states of ``logits`` (rows along ``dim``,
    any strides), whose local column 0 is global class ``vocab_start`` (a multiple of the
    tile).
``reduce_tile_states(states, *, tile_start, compute_entropy, compute_argmax, group=None)
-> RowSums``
    The rows' max, exact sums, probe, target logit and argmax over every tile — this shard's,
    then (``group``) every rank's: ``all_reduce(MAX)`` of the max, then ``all_reduce(SUM)`` of
    the integer sums (exact: the same bits in any order) and ``all_reduce(MIN)`` of the argmax.
``exact_rows(sums) -> ExactRows``
    The rows' (shift, log S, T / S, z_t) in float64 from the exact sums.
``token_rows(rows, target, ...) -> (logp, entropy | None, lse, stats)`` (``finish_rows``: of
``exact_rows``), ``cross_entropy_rows(rows, target, ...) -> (loss rows, z-loss rows, lse)``
    Each row's outputs, formed in float64 and rounded once to ``dtype``; ``stats`` (N, 3) =
    (shift, log s, μ) for the backward kernels. ``logp ≤ 0`` always.
``check_invariant_layout(vocab_start, v_local, n_classes)``
    Raise unless a shard starts on a tile boundary and, unless it ends the vocabulary, ends
    on one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import tiling
from .._runtime import accum_dtype, empty, launch, row_view
from ..kernels._invariant import invariant_merge_kernel, invariant_tile_stats_kernel
from ..options import HeadTransform

__all__ = [
    "FIXED_BITS",
    "RowSums",
    "TileStates",
    "check_invariant_layout",
    "finish_rows",
    "invariant_tile_stats",
    "reduce_tile_states",
]

FIXED_BITS = 44  # fractional bits of a tile's share (kernels/_invariant.py's FIXED_ONE)
NO_INDEX = 2**62


class TileStates(NamedTuple):
    """One shard's tile states: ``stats`` (N, tiles, 2 or 3) = (m, s[, τ]) in the math dtype,
    ``arg`` (N, tiles) int8 or None, ``z_t`` (N,) the target's logit where it lies in this
    shard (0 elsewhere)."""

    stats: torch.Tensor
    arg: torch.Tensor | None
    z_t: torch.Tensor


class RowSums(NamedTuple):
    """Per row, over the whole vocabulary: ``row_max`` M, ``sums`` (N, 2 or 4) int64 (S, T and,
    for fp64, their low limbs) in units of 2^−44 (2^−88), ``probe`` (0, or NaN when a share was
    not finite), ``z_t`` and ``argmax`` (int64, or None)."""

    row_max: torch.Tensor
    sums: torch.Tensor
    probe: torch.Tensor
    z_t: torch.Tensor
    argmax: torch.Tensor | None


def n_stats(compute_entropy: bool) -> int:
    return 3 if compute_entropy else 2


def check_invariant_layout(vocab_start: int, v_local: int, n_classes: int) -> None:
    """A shard of a batch-invariant vocab-parallel op must start on a multiple of
    ``tiling.INVARIANT_TILE`` and end on one (or at the end of the vocabulary), so that its
    tiles are tiles of the whole vocabulary."""
    tile = tiling.INVARIANT_TILE
    end = vocab_start + v_local
    if vocab_start % tile or (end % tile and end != n_classes):
        raise ValueError(
            f"batch_invariant=True needs every shard's classes to start and end on multiples of "
            f"{tile} (the last shard may end the vocabulary): this rank holds [{vocab_start}, "
            f"{end}) of {n_classes}. Pad the vocabulary to a multiple of {tile} × the group "
            f"size (as Megatron's make-vocab-size-divisible-by does)")


def empty_states(n_rows: int, n_tiles: int, dtype: torch.dtype, device: torch.device,
                 compute_entropy: bool, compute_argmax: bool) -> TileStates:
    """Buffers for ``n_rows`` rows of ``n_tiles`` tile states (z_t zeroed: a shard not holding
    a row's target adds 0 to it)."""
    stats = empty((n_rows, n_tiles, n_stats(compute_entropy)), dtype, device)
    arg = (torch.empty((n_rows, n_tiles), dtype=torch.int8, device=device)
           if compute_argmax else None)
    return TileStates(stats, arg, torch.zeros(n_rows, dtype=dtype, device=device))


def invariant_tile_stats(logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int = 0,
                         transform: HeadTransform, compute_entropy: bool,
                         compute_argmax: bool, dim: int = -1) -> TileStates:
    """Tile states of ``logits`` (rows along ``dim``, any strides; column 0 is global class
    ``vocab_start``) and the flat int32/int64 global ``target`` (in the rows' order): one read
    of the logits."""
    xv = row_view(logits, dim % logits.ndim)
    n_tiles = tiling.invariant_tiles(xv.n_cols)
    states = empty_states(xv.n_rows, n_tiles, accum_dtype(logits), logits.device,
                          compute_entropy, compute_argmax)
    if xv.n_rows == 0 or n_tiles == 0:
        return states
    rows = tiling.INVARIANT_ROWS
    launch(invariant_tile_stats_kernel, (tiling.cdiv(xv.n_rows, rows), n_tiles),
           (xv.tensor, target, states.stats,
            states.stats if states.arg is None else states.arg, states.z_t,
            xv.n_rows, xv.n_cols, xv.n_inner, vocab_start, *xv.strides,
            *transform.kernel_factors),
           path="invariant", num_warps=tiling.INVARIANT_WARPS, ROWS=rows,
           HEAD=transform.kernel_mode, N_STATS=n_stats(compute_entropy),
           COMPUTE_ENTROPY=compute_entropy, COMPUTE_ARGMAX=compute_argmax)
    return states


def _merge(states: TileStates, row_max: torch.Tensor, tile_start: int, compute_entropy: bool,
           compute_argmax: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(sums, probe, argmax candidates) of this shard's tiles against the rows' max."""
    n_rows, n_tiles = states.stats.shape[:2]
    wide = states.stats.dtype == torch.float64
    n_sums = 4 if wide else 2
    device = row_max.device
    sums = torch.empty((n_rows, n_sums), dtype=torch.int64, device=device)
    probe = empty((n_rows,), states.stats.dtype, device)
    best = torch.empty(n_rows, dtype=torch.int64, device=device) if compute_argmax else None
    if n_rows == 0:
        return sums, probe, best
    if n_tiles == 0:  # a shard of no classes adds nothing
        sums.zero_()
        probe.zero_()
        if best is not None:
            best.fill_(NO_INDEX)
        return sums, probe, best
    rows = tiling.INVARIANT_MERGE_ROWS
    launch(invariant_merge_kernel, (tiling.cdiv(n_rows, rows),),
           (states.stats, states.stats if states.arg is None else states.arg, row_max, sums,
            probe, sums if best is None else best, n_rows, n_tiles, tile_start),
           path="invariant", num_warps=4, ROWS=rows, BLOCK_T=tiling.INVARIANT_MERGE_TILES,
           N_STATS=states.stats.shape[2], N_SUMS=n_sums, COMPUTE_ENTROPY=compute_entropy,
           COMPUTE_ARGMAX=compute_argmax, EXTRA_LIMB=wide)
    return sums, probe, best


def reduce_tile_states(states: TileStates, *, tile_start: int = 0, compute_entropy: bool,
                       compute_argmax: bool, group=None) -> RowSums:
    """The rows' sums over every tile (module docstring). ``tile_start``: the global index of
    this shard's first tile. With ``group`` (a process group of more than one rank) the
    collectives make every rank's result the one a single device computes on the whole
    vocabulary: the max is exact under MAX, the sums under integer SUM, z_t adds zeros."""
    stats = states.stats
    if stats.shape[1]:
        row_max = stats[..., 0].amax(dim=1)
    else:
        row_max = torch.full(stats.shape[:1], float("-inf"), dtype=stats.dtype,
                             device=stats.device)
    z_t = states.z_t
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sums, probe, best = _merge(states, row_max, tile_start, compute_entropy, compute_argmax)
    if group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        floats = torch.stack([probe, z_t], dim=1)
        dist.all_reduce(floats, op=dist.ReduceOp.SUM, group=group)
        probe, z_t = floats.unbind(dim=1)
        if best is not None:
            dist.all_reduce(best, op=dist.ReduceOp.MIN, group=group)
    return RowSums(row_max, sums, probe, z_t, best)


def concat_sums(parts: list[RowSums]) -> RowSums:
    """Row chunks' sums, concatenated in order."""
    def cat(i):
        ts = [p[i] for p in parts]
        return None if ts[0] is None else torch.cat(ts)

    return RowSums(*(cat(i) for i in range(5)))


def permute_rows(sums: RowSums, order: torch.Tensor) -> RowSums:
    """``sums`` of slots, put back in token order: slot j is token ``order[j]``."""
    def back(t):
        if t is None:
            return None
        return torch.empty_like(t).index_copy_(0, order, t)

    return RowSums(*(back(t) for t in sums))


class ExactRows(NamedTuple):
    """The rows' statistics in float64 from their exact sums: ``shift`` (M, 0 where M = −inf),
    ``log_sum`` (log S), ``mu`` (T / S), ``z_t`` (the target's logit)."""

    shift: torch.Tensor
    log_sum: torch.Tensor
    mu: torch.Tensor
    z_t: torch.Tensor

    @property
    def lse(self) -> torch.Tensor:
        return self.shift + self.log_sum

    def stats(self, dtype: torch.dtype) -> torch.Tensor:
        """(N, 3) = (shift, log s, μ) in ``dtype``: what the backward kernels read."""
        return torch.stack([self.shift, self.log_sum, self.mu], dim=1).to(dtype)


def exact_rows(sums: RowSums) -> ExactRows:
    """float64 statistics of the rows from ``sums``::

        S = Σ v · 2^−44 (+ low limb · 2^−88) + probe,  T likewise;  shift = M (0 if M = −inf)

    ``S ≥ 1`` (the max tile adds ``s_b ≥ 1``) unless a share was NaN (then NaN)."""
    f64 = torch.float64
    m, raw, probe, z_t, _ = sums
    scale = 2.0**-FIXED_BITS
    s = raw[:, 0].to(f64) * scale
    tau = raw[:, 1].to(f64) * scale
    if raw.shape[1] == 4:
        s = s + raw[:, 2].to(f64) * scale * scale
        tau = tau + raw[:, 3].to(f64) * scale * scale
    probe = probe.to(f64)
    s, tau = s + probe, tau + probe
    shift = torch.where(m == float("-inf"), 0.0, m).to(f64)
    return ExactRows(shift, torch.log(s), tau / s, z_t.to(f64))


def target_checks(target: torch.Tensor, n_classes: int, ignore_index: int):
    """(valid, in_range) of flat global targets."""
    return target != ignore_index, (target >= 0) & (target < n_classes)


def token_rows(rows: ExactRows, target: torch.Tensor, *, n_classes: int, ignore_index: int,
               compute_entropy: bool, dtype: torch.dtype, computed: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(logp, entropy | None, lse, stats (N, 3)) of the rows, formed in float64 and rounded
    once to ``dtype``::

        lse = shift + log S;   logp = min((z_t − shift) − log S, 0);   H = log S − T / S

    ``z_t ≤ M`` and ``S ≥ 1`` make ``logp ≤ 0`` already; the ``min`` states it. Rows whose
    target is ``ignore_index``: logp 0, entropy 0; a target outside ``[0, n_classes)``: NaN.
    ``computed`` (bool, N): rows whose statistics were formed (the fused head skips ignored
    tokens): the others get lse NaN and stats 0."""
    valid, in_range = target_checks(target, n_classes, ignore_index)
    logp = torch.clamp((rows.z_t - rows.shift) - rows.log_sum, max=0.0)
    logp = torch.where(valid, torch.where(in_range, logp, float("nan")), 0.0)
    entropy = None
    if compute_entropy:
        entropy = torch.where(valid, rows.log_sum - rows.mu, 0.0).to(dtype)
    lse, stats = rows.lse, rows.stats(dtype)
    if computed is not None:
        lse = torch.where(computed, lse, float("nan"))
        stats = torch.where(computed[:, None], stats, 0.0)
    return logp.to(dtype), entropy, lse.to(dtype), stats


def finish_rows(sums: RowSums, target: torch.Tensor, *, n_classes: int, ignore_index: int,
                compute_entropy: bool, dtype: torch.dtype, computed: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`token_rows` of :func:`exact_rows`."""
    return token_rows(exact_rows(sums), target, n_classes=n_classes, ignore_index=ignore_index,
                      compute_entropy=compute_entropy, dtype=dtype, computed=computed)


def cross_entropy_rows(rows: ExactRows, target: torch.Tensor, *, n_classes: int,
                       ignore_index: int, weight: torch.Tensor | None, z_loss: float,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss rows, z-loss rows, lse) of class-index cross-entropy, float64 then rounded once::

        loss_row = w_t · ((shift − z_t) + log S) + λ · lse²     (0 on ignored rows)

    (the z-loss term ``λ · lse²`` also apart, for logging); NaN for a target outside
    ``[0, n_classes)``. ``weight`` is the global (n_classes,) class weights or None."""
    valid, in_range = target_checks(target, n_classes, ignore_index)
    nll = torch.clamp((rows.shift - rows.z_t) + rows.log_sum, min=0.0)
    if weight is not None:
        safe = torch.where(in_range, target, 0)
        nll = nll * weight.to(torch.float64)[safe]
    lse = rows.lse
    zl = z_loss * lse * lse if z_loss else torch.zeros_like(lse)
    loss = torch.where(valid, torch.where(in_range, nll + zl, float("nan")), 0.0)
    zl = torch.where(valid, zl, 0.0)
    return loss.to(dtype), zl.to(dtype), lse.to(dtype)

"""The shard layout every vocab-parallel function shares: the process group's rank and size, the
shard's place in the global vocabulary (given, or learnt by one small all_gather and checked the
same way on every rank), and DTensor inputs unwrapped to their local shard. Below the
functions that use it (``cross_entropy.py``, ``token_log_probs.py``), which never import each
other."""

from __future__ import annotations

import torch

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


def _layout(n_rows, v_local, dtype, device, group, rank, world, vocab_start_index, vocab_size,
            n_hidden=None, invariant=False) -> tuple[int, int]:
    """(vocab_start, vocab_size) of this rank's shard of ``v_local`` classes. Exchanges
    (V_local, N, start, dtype) — and the hidden size H when ``n_hidden`` is given (the linear
    variant, whose backward all-reduces (N, H)) — with one all_gather of 4 (5) int64 per rank
    and checks them, identically on every rank (so every rank raises the same error, and none
    is left waiting in a later collective). ``invariant`` (``batch_invariant=True``) also checks
    that every shard starts and ends on the invariant tile (``ops._invariant``); a given layout
    checks this rank's shard only."""
    import torch.distributed as dist

    from ..ops._invariant import check_invariant_layout

    if vocab_start_index is not None and vocab_size is not None:
        if not 0 <= vocab_start_index <= vocab_size - v_local:
            raise ValueError(
                f"vocab_start_index={vocab_start_index} with {v_local} local classes does not "
                f"fit in vocab_size={vocab_size}")
        if invariant:
            check_invariant_layout(vocab_start_index, v_local, vocab_size)
        return vocab_start_index, vocab_size
    start = -1 if vocab_start_index is None else vocab_start_index
    fields = [v_local, n_rows, start, _DTYPE_CODES[dtype]]
    if n_hidden is not None:
        fields.append(n_hidden)
    mine = torch.tensor(fields, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    meta = torch.stack(gathered).tolist()  # the one host read: world × 4 (5) integers
    sizes = [m[0] for m in meta]
    rows = {m[1] for m in meta}
    if len(rows) != 1:
        raise ValueError(f"every rank must hold the same rows: got N = {[m[1] for m in meta]} "
                         "rows per rank")
    if len({m[3] for m in meta}) != 1:
        names = {code: str(dt) for dt, code in _DTYPE_CODES.items()}
        raise ValueError(f"every rank's shard must have the same dtype, got "
                         f"{[names[m[3]] for m in meta]}")
    if n_hidden is not None and len({m[4] for m in meta}) != 1:
        raise ValueError(f"every rank must have the same hidden size, got H = "
                         f"{[m[4] for m in meta]} per rank")
    total = sum(sizes)
    if vocab_size is not None and vocab_size != total:
        raise ValueError(f"vocab_size={vocab_size} but the shards hold {total} classes "
                         f"({sizes} per rank)")
    starts = [m[2] for m in meta]
    if all(s == -1 for s in starts):
        starts = [sum(sizes[:r]) for r in range(world)]
    elif any(s == -1 for s in starts):
        raise ValueError("vocab_start_index must be given on every rank or on none, got "
                         f"{[None if s == -1 else s for s in starts]}")
    covered = 0
    for s, v in sorted(zip(starts, sizes, strict=True)):
        if s != covered:
            raise ValueError(f"the shards must tile [0, {total}) exactly: got (start, size) per "
                             f"rank {list(zip(starts, sizes, strict=True))}")
        covered += v
    if invariant:
        for s, v in zip(starts, sizes, strict=True):
            check_invariant_layout(s, v, total)
    return starts[rank], total


def _check_layout_args(vocab_start_index, vocab_size) -> None:
    for name, value in (("vocab_start_index", vocab_start_index), ("vocab_size", vocab_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 0):
            raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")


def _check_whole_vocabulary(v_local, vocab_start_index, vocab_size) -> None:
    """With one rank the shard must be the whole vocabulary."""
    if vocab_start_index not in (None, 0) or vocab_size not in (None, v_local):
        raise ValueError(
            f"with one rank the shard is the whole vocabulary ({v_local} classes), "
            f"got vocab_start_index={vocab_start_index}, vocab_size={vocab_size}")


def _check_backend(dist, group, device: torch.device) -> None:
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group uses NCCL, which needs CUDA tensors; input is on "
                         f"{device}")


def _group_layout(n_rows, v_local, dtype, device, group, vocab_start_index, vocab_size, *,
                  n_hidden=None, invariant=False) -> tuple[int, int, int]:
    """(world size, vocab_start, vocab_size) of this rank's shard of ``v_local`` classes, for
    every vocab-parallel function: with one rank (or no process group) the shard must be the
    whole vocabulary; with more the backend must suit ``device`` and the layout is learnt or
    checked by :func:`_layout` (``n_hidden``: the linear forms' H, checked too; ``invariant``:
    the shards' tile alignment)."""
    rank, world = _group_world(group)
    if world == 1:
        _check_whole_vocabulary(v_local, vocab_start_index, vocab_size)
        return world, 0, v_local
    _check_backend(_dist(), group, device)
    start, total = _layout(n_rows, v_local, dtype, device, group, rank, world,
                           vocab_start_index, vocab_size, n_hidden=n_hidden,
                           invariant=invariant)
    return world, start, total


def _is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (False where torch.distributed is not
    built in)."""
    if _dist() is None:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _class_shard(t, class_dim: int, name: str):
    """(local shard, mesh, vocab_start, vocab_size) of DTensor ``t`` sharded on ``class_dim``
    over a 1-D mesh, in torch.chunk's layout (DTensor's ``Shard``); the local tensor comes from
    ``to_local()``, so the gradient flows back as a DTensor of the same placement."""
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"{name} is a DTensor on a {mesh.ndim}-D device mesh: only a 1-D mesh "
                         "(the tensor-parallel group) is supported")
    (placement,) = t.placements
    if not (isinstance(placement, Shard) and placement.dim % t.ndim == class_dim):
        raise ValueError(f"{name} is a DTensor with placement {placement}: it must be sharded "
                         f"on its class dim (Shard({class_dim if class_dim == 0 else -1}))")
    world, rank = mesh.size(), mesh.get_local_rank()
    vocab = t.shape[class_dim]
    chunk = -(-vocab // world)  # torch.chunk's layout
    start = min(rank * chunk, vocab)
    local = t.to_local()
    if local.shape[class_dim] != min(chunk, vocab - start):
        raise ValueError(f"{name}'s local shard has {local.shape[class_dim]} classes but "
                         f"Shard of {vocab} over {world} ranks gives rank {rank} "
                         f"{min(chunk, vocab - start)}")
    return local, mesh, start, vocab


def _replicated_local(t, name: str, mesh=None):
    """A replicated DTensor's local tensor (``to_local()``: the gradient flows back as a
    replicated DTensor); anything else as it is."""
    if not _is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate

    if any(not isinstance(p, Replicate) for p in t.placements):
        raise ValueError(f"{name} is a DTensor with placements {t.placements}: it must be "
                         "replicated")
    if mesh is not None and t.device_mesh != mesh:
        raise ValueError(f"{name} is a DTensor on another device mesh than the sharded head")
    return t.to_local()


def _check_no_layout_args(group, vocab_start_index, vocab_size) -> None:
    if group is not None or vocab_start_index is not None or vocab_size is not None:
        raise ValueError("group, vocab_start_index and vocab_size come from a DTensor's mesh "
                         "and shape: leave them None")


def _unwrap_dtensor(input, target, group, vocab_start_index, vocab_size):
    """(local logits, local target, group, vocab_start, vocab_size) of a DTensor input sharded
    on its class dim over a 1-D mesh (module docstring)."""
    local, mesh, start, vocab = _class_shard(input, input.ndim - 1, "input")
    _check_no_layout_args(group, vocab_start_index, vocab_size)
    target = _replicated_local(target, "target", mesh)
    return local, target, mesh.get_group(), start, vocab


def _unwrap_head_dtensor(input, linear_weight, linear_bias, target, group, vocab_start_index,
                         vocab_size):
    """(local input, local head rows, local bias, local target, group, vocab_start, vocab_size)
    of an LM head whose ``linear_weight`` (V, H) is a DTensor sharded on its class dim
    (``Shard(0)``) over a 1-D mesh; ``linear_bias`` a DTensor sharded the same way (or None),
    ``input`` and ``target`` plain tensors or replicated DTensors on that mesh."""
    local_w, mesh, start, vocab = _class_shard(linear_weight, 0, "linear_weight")
    _check_no_layout_args(group, vocab_start_index, vocab_size)
    local_b = None
    if linear_bias is not None:
        if not _is_dtensor(linear_bias):
            raise ValueError("linear_weight is a DTensor, so linear_bias must be one too "
                             "(sharded on its class dim, Shard(0))")
        local_b, bias_mesh, bias_start, bias_vocab = _class_shard(linear_bias, 0, "linear_bias")
        if bias_mesh != mesh or (bias_start, bias_vocab) != (start, vocab):
            raise ValueError("linear_bias must be sharded as linear_weight (same mesh, "
                             "Shard(0) of the same classes)")
    return (_replicated_local(input, "input", mesh), local_w, local_b,
            _replicated_local(target, "target", mesh), mesh.get_group(), start, vocab)


# --------------------------------------------------------------------------- tensor factors


class _ScaleShard(torch.autograd.Function):
    """``x_r · f`` for a tensor split over the ranks (a logits shard, a bias shard) times a
    factor every rank holds the same (a tensor ``logit_scale`` / ``logit_divisor`` /
    ``temperature``, ``options.split_tensor_factors``). ``d f = Σ_r Σ g_r ⊙ x_r``: each rank
    sums its shard and one ``all_reduce(SUM)`` of that scalar gives every rank the whole
    gradient (as the replicated hidden states' dh is all-reduced). Runs on every rank when
    the factor requires grad, which must therefore agree across ranks."""

    @staticmethod
    def forward(ctx, x, factor, group):
        ctx.save_for_backward(x, factor)
        ctx.group = group
        return x * factor

    @staticmethod
    def backward(ctx, grad):
        x, factor = ctx.saved_tensors
        dx = grad * factor if ctx.needs_input_grad[0] else None
        dfactor = None
        if ctx.needs_input_grad[1]:
            dfactor = (grad * x).sum(dtype=torch.promote_types(x.dtype, factor.dtype))
            _dist().all_reduce(dfactor, op=_dist().ReduceOp.SUM, group=ctx.group)
            dfactor = dfactor.to(device=factor.device, dtype=factor.dtype)
        return dx, dfactor, None


def scale_shard(x, factor, group, world: int, name: str = "input"):
    """``x · factor`` for this rank's shard ``x`` (``x`` itself without a factor): with more
    than one rank the factor's gradient is all-reduced over ``group`` (:class:`_ScaleShard`)."""
    from ..options import check_factor_device, scale_by_factor

    if x is None or factor is None or world == 1:
        return scale_by_factor(x, factor, name)
    check_factor_device(factor, x, name)
    return _ScaleShard.apply(x, factor, group)

"""Binary cross-entropy with logits: forward (per-element or reduced, optionally writing the
gradient), the finishing sum, the gradient's rescale, and the recompute backward.

Elementwise over flattened contiguous ``x`` (logits) and ``t`` (targets) of ``numel`` elements;
program ``p`` handles ``[p·BLOCK, (p+1)·BLOCK)`` with int64 offsets. Maths in fp32 (fp64 when any
operand is fp64), torch's formula written so that nothing overflows:

    lw   = 1 + (pw − 1)·t                           (pw = pos_weight, 1 when absent)
    loss = w · ((1 − t)·x + lw·(log1p(exp(−|x|)) + max(−x, 0)))      [= (1 − t)·x − lw·log σ(x)]
         = w · ((1 − t)·x  if x ≥ 0  else  −pw·t·x)  +  w · lw · log1p(exp(−|x|))
    dx   = w · (σ(x)·lw − pw·t) · g / divisor       (g: grad_output; divisor: numel for mean, or 1)

``exp(−|x|) ≤ 1`` so ±1e4 logits stay finite, and the folded linear term has no cancellation
(torch's form loses ~ulp(|x|) to it at large |x| with soft targets). ±inf give torch's values:
NaN at x = −inf (inf − inf in torch's form) and at x = +inf with t = 1 (0·inf), else +inf.

Broadcast operands (``weight``, ``pos_weight``) are never materialised: the host describes the
operand expanded to the input's shape by at most two *index terms* ``(inner, size, stride)``, and
element ``i`` reads ``Σ ((i // inner) % size) · stride`` (see ``broadcast_offset``). Each operand's
terms travel as one tuple argument of six ints ``(inner0, size0, stride0, inner1, size1,
stride1)``; Triton specialises each element as it would a plain int (1 becomes a constant).
``TERMS`` is −1 for an absent operand (value 1), 0 for a single value, else 1 or 2.

A reduced loss costs one extra small launch, ``bce_finish_kernel``: the forward writes one
partial sum per program and a single wide program adds them in a fixed order (no atomics, so the
loss is bit-identical between runs), divides by the mean's divisor and casts.

HBM bytes per element (``e`` = element size; weights are small and L2-resident when broadcast):
reduced forward reads x and t (2·e) and, when writing the gradient, writes dx (3·e in all, the
floor of forward+backward); ``none`` forward reads x, t and writes the loss (3·e); the recompute
backward reads x, t, g and writes dx (4·e; 3·e with a scalar g); scaling a forward-written dx by
g ≠ 1 reads and writes it (2·e) and costs one tiny launch that returns at once when g == 1.
"""

import triton
import triton.language as tl

from ._online import upcast
from .sigmoid import log1p_from_parts, sigmoid_from_parts, sigmoid_parts


@triton.jit
def broadcast_offset(idx, terms, TERMS: tl.constexpr):
    """Offset of flat element ``idx`` in an operand broadcast to the input's shape; ``terms`` is
    ``(inner0, size0, stride0, inner1, size1, stride1)``."""
    off = ((idx // terms[0]) % terms[1]) * terms[2]
    if TERMS == 2:
        off += ((idx // terms[3]) % terms[4]) * terms[5]
    return off


@triton.jit
def load_broadcast(ptr, idx, mask, terms, TERMS: tl.constexpr):
    """The operand's value at each element (upcast), or 1.0 when absent (TERMS = −1)."""
    if TERMS < 0:
        return 1.0
    elif TERMS == 0:
        return upcast(tl.load(ptr))
    else:
        return upcast(tl.load(ptr + broadcast_offset(idx, terms, TERMS), mask=mask, other=1.0))


@triton.jit
def _bce_terms(x_ptr, t_ptr, w_ptr, pw_ptr, offs, mask, w_terms, pw_terms,
               W_TERMS: tl.constexpr, PW_TERMS: tl.constexpr):
    """Load one tile; return (x, t, w, pw, lw) upcast (w and pw may be the scalar 1.0)."""
    x = upcast(tl.load(x_ptr + offs, mask=mask, other=0.0))
    t = upcast(tl.load(t_ptr + offs, mask=mask, other=0.0))
    w = load_broadcast(w_ptr, offs, mask, w_terms, W_TERMS)
    pw = load_broadcast(pw_ptr, offs, mask, pw_terms, PW_TERMS)
    lw = 1.0 + (pw - 1.0) * t
    return x, t, w, pw, lw


@triton.jit
def _bce_loss(x, t, w, pw, lw, e, u, r):
    """The formula above with its two linear terms folded per sign of x, so nothing cancels:
    (1 − t)·x + lw·max(−x, 0) is (1 − t)·x for x ≥ 0 and −pw·t·x for x < 0 (both ≥ 0 for
    t ∈ [0, 1], pw ≥ 0). At x = −inf torch's form is inf − inf = NaN; so is this one."""
    linear = tl.where(x >= 0, (1.0 - t) * x, -(pw * t) * x)
    linear = tl.where(x == float("-inf"), float("nan"), linear)
    return w * (linear + lw * log1p_from_parts(e, u, r))


@triton.jit
def _bce_grad(x, t, w, pw, lw, e, r):
    """d loss / dx before the divisor and grad_output."""
    return w * (sigmoid_from_parts(x, e, r) * lw - pw * t)


@triton.jit
def bce_fwd_kernel(
    # data: x, t, loss contiguous; w, pw addressed by index terms; partial: one value a program
    x_ptr, t_ptr, w_ptr, pw_ptr, loss_ptr, partial_ptr, dx_ptr,
    # shape and the gradient's divisor (numel for mean, 1 for sum; an int, exact in fp64 math)
    numel, divisor,
    # index terms (six-int tuples) of weight, then of pos_weight
    w_terms, pw_terms,
    # tiling and flavour
    BLOCK: tl.constexpr, W_TERMS: tl.constexpr, PW_TERMS: tl.constexpr,
    REDUCE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    """One BLOCK: ``REDUCE`` writes the tile's loss sum to ``partial[p]`` (else the per-element
    loss); ``COMPUTE_GRAD`` (with ``REDUCE``) also writes ``dx = grad / divisor``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x, t, w, pw, lw = _bce_terms(x_ptr, t_ptr, w_ptr, pw_ptr, offs, mask, w_terms, pw_terms,
                                 W_TERMS, PW_TERMS)
    e, u, r = sigmoid_parts(x)
    loss = _bce_loss(x, t, w, pw, lw, e, u, r)
    if REDUCE:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, loss, 0.0), axis=0))
        if COMPUTE_GRAD:
            dx = _bce_grad(x, t, w, pw, lw, e, r) / divisor
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bce_finish_kernel(
    # data: n_partials values (fp32, fp64 for fp64 math), one scalar out (the loss's dtype)
    partial_ptr, out_ptr,
    # shape and the divisor (numel for mean, 1 for sum)
    n_partials, divisor,
    BLOCK: tl.constexpr,
):
    """One program: out = Σ partial / divisor. Each lane sums its partials in index order, the
    lanes are reduced once at the end: bit-identical between runs. BLOCK is wide (thousands of
    lanes, several 16-byte loads a thread), so the 65,536 partials of a 2^28-element loss are a
    few loop trips, not a serial walk."""
    idx = tl.arange(0, BLOCK)
    acc = tl.load(partial_ptr + idx, mask=idx < n_partials, other=0.0)
    for start in range(BLOCK, n_partials, BLOCK):
        acc += tl.load(partial_ptr + start + idx, mask=start + idx < n_partials, other=0.0)
    total = tl.sum(acc, axis=0) / divisor
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


@triton.jit
def bce_scale_grad_kernel(
    # data: dx (contiguous, scaled in place) and the scalar grad_output g
    dx_ptr, g_ptr,
    # shape
    numel,
    BLOCK: tl.constexpr,
):
    """dx *= g in place, reading g on the device. A small grid (about one program per SM) walks
    the tensor BLOCK by BLOCK, programs P apart; when g == 1 exactly (the usual
    ``loss.backward()``) every program returns at once, so the forward-written gradient costs
    one near-empty launch and no bytes."""
    g = upcast(tl.load(g_ptr))
    if g != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, numel, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            dx = upcast(tl.load(dx_ptr + offs, mask=mask, other=0.0))
            tl.store(dx_ptr + offs, (dx * g).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bce_bwd_kernel(
    # data: x, t, g (unless G_SCALAR), dx contiguous; w, pw addressed by index terms
    x_ptr, t_ptr, w_ptr, pw_ptr, g_ptr, dx_ptr,
    # shape and the gradient's divisor (numel for mean, 1 otherwise)
    numel, divisor,
    # index terms (six-int tuples) of weight, then of pos_weight
    w_terms, pw_terms,
    # tiling and flavour
    BLOCK: tl.constexpr, W_TERMS: tl.constexpr, PW_TERMS: tl.constexpr,
    G_SCALAR: tl.constexpr, UNLESS_ONE: tl.constexpr = False,
):
    """dx = grad · g / divisor recomputed from x and t; g is one value (``G_SCALAR``: the reduced
    loss's grad_output) or one per element (reduction ``none``). Programs walk the tensor BLOCK
    by BLOCK, P apart (the recompute path launches one program a BLOCK: one step each).
    ``UNLESS_ONE`` (scalar g; dx holds the forward's gradient for g = 1, on a grid of about one
    program per SM): every program returns at once when g is exactly 1 — the usual
    ``loss.backward()`` costs one near-empty launch and no bytes — else dx is recomputed for
    g and rounded once (scaling the stored 16-bit gradient would round twice)."""
    run = True
    if UNLESS_ONE:
        run = upcast(tl.load(g_ptr)) != 1.0
    if run:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, numel, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            x, t, w, pw, lw = _bce_terms(x_ptr, t_ptr, w_ptr, pw_ptr, offs, mask, w_terms,
                                         pw_terms, W_TERMS, PW_TERMS)
            if G_SCALAR:
                g = upcast(tl.load(g_ptr))
            else:
                g = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0))
            e, u, r = sigmoid_parts(x)
            dx = _bce_grad(x, t, w, pw, lw, e, r) * g / divisor
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

"""Softmax cross-entropy: launchers, the registered custom ops, autograd, the public function,
one job a module:

- ``launch.py``: the launchers, which run the kernels of ``probact_gpu.kernels.cross_entropy``
  (every launch through ``_runtime.launch``, which records it), and the row-view helpers;
- ``custom_ops.py``: the ``probact_gpu::cross_entropy*`` torch.library ops wrapping them (with
  fake implementations, so ``torch.compile(fullgraph=True)`` traces them), taking the options
  flattened by ``CrossEntropyOptions.schema_args`` (native schema types);
- ``autograd.py``: autograd registered on the main op;
- ``inplace.py``: the ``autograd.Function`` of ``inplace_backward=True`` and its checks;
- ``soft_targets.py``: class-probability targets;
- ``function.py``: ``cross_entropy``, the public function. Its options are validated once, by
  ``CrossEntropyOptions``.

Launchers meant for reuse (fused linear+CE, vocab-parallel CE); no host sync in any of them.
Each takes the options either as keywords (``weight``, ``ignore_index``, ``reduction``,
``label_smoothing``, ``z_loss``, ``softcap``, ``logit_scale``, ``logit_divisor``,
``temperature``, ``normalizer`` where it applies) or as one ``options=CrossEntropyOptions``
(then those keywords must stay at their defaults):

``cross_entropy_fwd(logits, target, *, <options>, compute_grad=False, grad_out=None,
total_weight=None, config=None) -> (loss_rows, lse, dlogits | None)``
    ``logits`` (N, C) of any strides, ``target`` (N,) int32/int64. ``loss_rows`` and ``lse`` are
    (N,) fp32 (fp64 for fp64 logits), unreduced. With ``compute_grad``, dlogits of the *reduced*
    loss (sum, divided by a ``normalizer``; mean divides by ``total_weight``, a 0-d device
    tensor, computed from these targets when None; ``reduction="none"`` gives the gradient of
    ``loss_rows.sum()``) is written to ``grad_out`` (which may be ``logits`` itself: in place)
    or a new tensor, and returned.

``cross_entropy_total_weight(target, n_classes, *, weight=None, ignore_index=-100, dtype)``
    The mean's divisor, Σ w_t over non-ignored targets, as a 0-d device tensor.

``cross_entropy_mean_divisors(target, n_classes, options, dtype) -> (total_weight, z_scale)``
    The same divisor, and (class weights and a z-loss) the z term's scale ``Σ w_t / (non-ignored
    rows)``, else None; the launchers take it as ``z_scale=`` and multiply ``z_loss`` by it.

Split row, with a column offset so a rank holding classes ``[vocab_start, vocab_start + V_local)``
of ``n_classes`` calls them on its shard (``weight`` is always the *global* (n_classes,) vector):

``cross_entropy_partial_stats(logits, target, *, vocab_start=0, <options>, config=None)``
    (N, S, 4) fp32: per (row, chunk) max z, Σ exp(z − max), z_t (0 unless the target is in the
    chunk), Σ w·z. Partials from several ranks concatenate along dim 1 (all_gather) before:
``cross_entropy_combine(stats, target, n_classes, *, <options>) -> (loss_rows, lse)``
``cross_entropy_grad(logits, target, lse, grad, *, vocab_start=0, n_classes=None, <options>,
divisor=None, out=None, config=None) -> dlogits``
    ``grad``: 0-d or (N,) device tensor (grad_output), divided by ``divisor`` (0-d) when given
    and by a ``normalizer``. ``out`` may be ``logits`` (in place).

``cross_entropy_finish(rows, *, divisor=None, denom=1.0, dtype=None)``: the reduced loss,
``Σ rows / (denom · divisor)``, cast to ``dtype``, in one deterministic kernel.

``cross_entropy_regrad_(dx, logits, target, lse, grad_output, *, options, divisor=None,
z_scale=None)``: the fused gradient ``dx`` (for grad_output 1) made the gradient for the 0-d
``grad_output``, on the device: untouched when it is exactly 1, else recomputed from the logits
and rounded once (the out-of-place backward of a reduced loss).

``cross_entropy_scale_grad(dx, grad_output)``: ``dx *= grad_output`` on the device (the in-place
path's backward, which has no logits left to recompute from: two roundings when grad_output is
not 1).

A tensor a kernel writes (``grad_out``, ``out``, ``dx``) is never a hidden copy: one whose
memory overlaps itself (an expanded tensor) is refused before anything is written; one whose
dims after the class dim do not merge into one stride is written through a contiguous
temporary that is then copied back into it, explicitly.

Long rows with the fused gradient run a persistent sweep (one program per SM, looping over
rows) when one program per row would put more rows in flight than L2 holds for the second
sweep's re-read (``tiling.choose_cross_entropy_config``); ``config=RowConfig("multi", ...,
n_programs=P)`` forces P programs, ``n_programs=0`` one per row.

Rows Triton cannot prove 16-byte aligned (a row stride like V = 50257, a sliced view's base)
run the sweep forward, the backward and the gradient rescale with ``PEEL_EDGES`` (16-byte
accesses for all but a row's first and last few elements) whenever the logits' and the
gradient's rows sit at one offset from a 16-byte boundary: ``tiling.peel_row_edges``; the launch
record's meta says which ran.

Semantics not fixed by torch: a target outside ``[0, C)`` that is not ``ignore_index`` gives a
NaN loss for its row (and a NaN gradient row) instead of an error; all targets ignored with
``reduction="mean"`` gives NaN (0 / 0), as torch; the z-loss term ``z_loss · lse²`` is added per
non-ignored row and, for ``"mean"``, averaged over the non-ignored rows: with class weights the
rows carry it scaled by ``Σ w_t / (non-ignored rows)`` (``z_scale``), so that dividing every
row by Σ w_t gives ``z_loss · Σ lse² / (non-ignored rows)`` whatever the weights' overall scale.

Precision: float options (``label_smoothing``, ``z_loss``, the transform's factors
``logit_scale / logit_divisor``, ``softcap`` and ``1 / temperature``, a numeric normalizer)
reach the kernels as fp32 scalars. The single-tile and sweep forwards form ``lse − z_t`` and
the smoothing sum around the row's max, so |x| ~ 1e4 loses nothing; the split path's smoothing
partial (Σ w·z per chunk) and the from-lse gradient (``exp(z − lse)``) carry an absolute error
of about ulp(|x|) there. The from-lse gradient (the backward of ``reduction="none"``, and the
split path) also carries lse's own rounding to fp32: every p is off by up to ulp(lse)/2
relative, where torch's ``exp(log_softmax)`` is off by ulp(log p) (at 9 × 7 logits of scale 2,
3.6 ulps of the largest dx against torch's 1.6). A row that is one whole tile of the backward
therefore recomputes its own max and Σ exp (``ROW_STATS``); longer rows keep the lse error —
saving lse as a float64, or the row's max and log Σ exp apart as the token log-probs ops do,
would remove it there too.
"""

from .function import cross_entropy
from .inplace import CrossEntropyInplaceFunction
from .launch import (
    cross_entropy_combine,
    cross_entropy_finish,
    cross_entropy_fwd,
    cross_entropy_grad,
    cross_entropy_mean_divisors,
    cross_entropy_partial_stats,
    cross_entropy_regrad_,
    cross_entropy_scale_grad,
    cross_entropy_total_weight,
)

__all__ = [
    "CrossEntropyInplaceFunction",
    "cross_entropy",
    "cross_entropy_combine",
    "cross_entropy_finish",
    "cross_entropy_fwd",
    "cross_entropy_grad",
    "cross_entropy_mean_divisors",
    "cross_entropy_partial_stats",
    "cross_entropy_regrad_",
    "cross_entropy_scale_grad",
    "cross_entropy_total_weight",
]

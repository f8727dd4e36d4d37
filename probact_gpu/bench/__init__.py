"""The benchmark harness behind ``probact-gpu bench`` (inside the package so the installed
command can import it). Nothing is imported or measured at import time.

- ``shapes``: the bench shapes, the ``--quick`` subset and the ``--smoke`` tiny shapes.
- ``bytes``: the minimal-bytes model (GB/s) and the matmul FLOPs of the linear ops.
- ``timing``: ``do_bench`` median/p20/p80, the copy-rate ceiling, peak extra memory.
- ``providers``: probact (looked up at run time), torch eager (and chunked, for the LM-head
  outputs), torch.compile, Liger-Kernel, cut-cross-entropy; the inputs and the step each pass
  times.
- ``runner``: runs the plan; a missing or raising provider is a skipped row with the reason.
- ``report``: markdown table, JSON (schema in its docstring), PNG plots, result files; the same
  for ``--traffic``.
- ``traffic``: ``bench --traffic``, bytes, launches and allocations per call counted through the
  interpreter at the full shapes' launch configs, and the L2 model of the re-reads.
"""

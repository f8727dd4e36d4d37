"""The benchmark harness behind ``probact-gpu bench`` (inside the package so the installed
command can import it). Nothing is imported or measured at import time.

- ``shapes``: PERF.md's shapes, the ``--quick`` subset and the ``--smoke`` tiny shapes.
- ``bytes``: the minimal-bytes model (GB/s) and the matmul FLOPs of linear + cross-entropy.
- ``timing``: ``do_bench`` median/p20/p80, the copy-rate ceiling, peak extra memory.
- ``providers``: probact (looked up at run time), torch eager, torch.compile, Liger-Kernel;
  the inputs and the step each pass times.
- ``runner``: runs the plan; a missing or raising provider is a skipped row with the reason.
- ``report``: markdown table, JSON (schema in its docstring), PNG plots, result files.
"""

"""Benchmark: BCE-with-logits.
Every provider side by side.

    python perf/bench_bce.py [--dtype bf16|fp16|fp32] [--pass fwd|bwd|fwd_bwd]
        [--quick] [--smoke] [--out perf/results]

A thin driver of `probact-gpu bench` (probact_gpu.bench): the same options, with --op fixed to
this family. Without a CUDA device it runs the untimed smoke pass only.
"""

import sys

from probact_gpu.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "bce", *sys.argv[1:]]))

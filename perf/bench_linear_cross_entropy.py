"""Benchmark: linear + cross-entropy (time, peak memory, TFLOP/s of the matmuls).
Every provider side by side.

    python perf/bench_linear_cross_entropy.py [--dtype bf16|fp16|fp32] [--pass fwd|bwd|fwd_bwd]
        [--quick] [--smoke] [--out perf/results]

A thin driver of `probact-gpu bench` (probact_gpu.bench): the same options, with --op fixed to
this family. Without a CUDA device it runs the untimed smoke pass only.
"""

import sys

from probact_gpu.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "linear_cross_entropy", *sys.argv[1:]]))

"""Benchmark: token_log_probs and linear_token_log_probs (per-token log-prob and entropy of the
LM head). Every provider side by side: probact, the unfused torch path (log_softmax + gather +
entropy), the same over 512-token chunks, torch.compile.

    python perf/bench_token_log_probs.py [--dtype bf16|fp16|fp32] [--pass fwd|fwd_bwd]
        [--quick] [--smoke] [--out perf/results]

A thin driver of `probact-gpu bench` (probact_gpu.bench): the same options, with --op fixed to
this family. Without a CUDA device it runs the untimed smoke pass only.
"""

import sys

from probact_gpu.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "token_log_probs", "--op", "linear_token_log_probs",
                   *sys.argv[1:]]))

"""Benchmark: distillation on logits (KL, reverse KL, JSD, TVD) and the fused linear JSD from both
heads' hidden states. Every provider side by side: probact, torch eager (both heads'
log_softmax in fp32, then F.kl_div / TRL's mixture / ½|p − q|), torch.compile, Liger-Kernel
(its KL / JSD / TVD losses and its fused linear JSD, where installed).

    python perf/bench_distillation.py [--dtype bf16|fp16|fp32] [--pass fwd|fwd_bwd]
        [--quick] [--smoke] [--out perf/results]

A thin driver of `probact-gpu bench` (probact_gpu.bench): the same options, with --op fixed to
this family. Without a CUDA device it runs the untimed smoke pass only.
"""

import sys

from probact_gpu.cli import main

OPS = ("distillation_kl", "distillation_reverse_kl", "distillation_jsd", "distillation_tvd",
       "linear_distillation_jsd")

if __name__ == "__main__":
    sys.exit(main(["bench", *(a for op in OPS for a in ("--op", op)), *sys.argv[1:]]))

"""Benchmark: one training step (forward + backward + AdamW step) of a Llama-shaped Hugging Face
causal LM built from a random config, unpatched against patched with
``probact_gpu.integrations.transformers.patch`` (the loss without the tokens × vocab logits).

    python perf/bench_hf_train_step.py [--out bench-out] [--steps 10] [--warmup 3] [--smoke]

On CUDA: hidden 2048, 4 layers, vocab 128256, bf16, batch 4 × seq 2048 (no download: the
weights are random); each step timed with CUDA events after the warm-up (median, min, max),
peak memory is ``torch.cuda.max_memory_allocated()`` over the timed steps after
``reset_peak_memory_stats()`` (weights, gradients and AdamW state included). Without CUDA, or
with ``--smoke``: a tiny fp32 model runs one step of each variant through Triton's interpreter
and the two losses must agree to 1e-4; nothing is timed. Writes ``hf_train_step.md`` and
``hf_train_step.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from pathlib import Path

import torch

import probact_gpu
from probact_gpu.bench.timing import MIB

FULL = dict(hidden=2048, layers=4, heads=16, kv_heads=8, intermediate=8192, vocab=128256,
            batch=4, seq=2048, dtype="bf16")
SMOKE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000,
             batch=2, seq=16, dtype="fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VARIANTS = ("unpatched", "patched")
SMOKE_ATOL = 1e-4


def build(shape: dict, device: torch.device, patched: bool):
    """The same random-weight model for both variants (seeded), optionally patched."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"], vocab_size=shape["vocab"],
        max_position_embeddings=max(shape["seq"], 128), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device,
                                                     dtype=DTYPES[shape["dtype"]])
    model.train()
    if patched:
        from probact_gpu.integrations.transformers import patch

        if not patch(model):
            raise SystemExit("patch(model) declined the Llama model (see the warning)")
    return model


def batch(shape: dict, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
    return ids.to(device)


def make_step(model, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def run_cuda(shape: dict, device: torch.device, variant: str, steps: int, warmup: int) -> dict:
    model = build(shape, device, variant == "patched")
    step = make_step(model, batch(shape, device))
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated(device) / MIB
    del model, step
    gc.collect()
    torch.cuda.empty_cache()
    return {"variant": variant, "ms_median": statistics.median(times), "ms_min": min(times),
            "ms_max": max(times), "peak_mib": peak, "first_loss": losses[0], "steps": steps,
            "warmup": warmup}


def run_smoke(shape: dict, device: torch.device, variant: str) -> dict:
    model = build(shape, device, variant == "patched")
    loss = float(make_step(model, batch(shape, device))())
    return {"variant": variant, "ms_median": None, "ms_min": None, "ms_max": None,
            "peak_mib": None, "first_loss": loss, "steps": 1, "warmup": 0}


def table(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "not timed" if v is None else format(v, spec)

    lines = ["| variant | step ms median (min–max) | peak MiB | loss (first step run) |",
             "|---|---|---|---|"]
    for r in rows:
        ms = fmt(r["ms_median"], ".2f")
        if r["ms_min"] is not None:
            ms += f" ({r['ms_min']:.2f}–{r['ms_max']:.2f})"
        lines.append(f"| {r['variant']} | {ms} | {fmt(r['peak_mib'], ',.0f')} | "
                     f"{r['first_loss']:.6f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="directory for the .md and .json")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (CUDA)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (CUDA)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, one untimed step per variant (automatic without CUDA)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:  # the kernels run through Triton's interpreter: chosen before triton loads
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("triton was imported before the CPU interpreter could be chosen; run with "
                  "TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import transformers
    except ImportError:
        print("bench_hf_train_step needs transformers: pip install 'probact-gpu[transformers]'",
              file=sys.stderr)
        return 2

    shape = SMOKE if smoke else FULL
    if smoke:
        rows = [run_smoke(shape, device, v) for v in VARIANTS]
    else:
        rows = [run_cuda(shape, device, v, args.steps, args.warmup) for v in VARIANTS]

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "probact_gpu": getattr(probact_gpu, "__version__", "?"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    title = (f"# HF train step: Llama {shape['layers']} layers, hidden {shape['hidden']}, "
             f"vocab {shape['vocab']}, {shape['dtype']}, batch {shape['batch']} × seq "
             f"{shape['seq']} on {env['device']}")
    md = f"{title}\n\n{table(rows)}\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_train_step.md").write_text(md)
    (out / "hf_train_step.json").write_text(json.dumps(
        {"schema": "probact-gpu-hf-train-step/1", "smoke": smoke, "shape": shape, "env": env,
         "rows": rows}, indent=2) + "\n")
    print(md)

    if smoke:
        diff = abs(rows[0]["first_loss"] - rows[1]["first_loss"])
        print(f"--smoke: nothing was timed (no CUDA or --smoke); loss |unpatched - patched| = "
              f"{diff:.2e}")
        if diff > SMOKE_ATOL:
            print(f"FAIL: the losses differ by more than {SMOKE_ATOL}", file=sys.stderr)
            return 1
    print(f"wrote {out / 'hf_train_step.md'} and {out / 'hf_train_step.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

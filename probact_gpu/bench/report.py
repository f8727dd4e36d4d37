"""The bench's outputs: a markdown table (stdout and ``<date>.md``), JSON (``<date>.json``) and
PNG plots (``<date>.png``), written to ``<out>/<gpu-slug>/``. ``bench --traffic`` has its own
table and JSON (``TRAFFIC_SCHEMA``, checked by :func:`validate_traffic`; its rows are
``bench.traffic.TrafficRow``) with the same ``env``.

JSON schema (``SCHEMA`` = ``"probact-gpu-bench/1"``), checked by :func:`validate`::

    {
      "schema": "probact-gpu-bench/1",
      "env": {                       # where and with what it was measured
        "mode": "cuda" | "smoke",    # smoke: untimed pass on tiny shapes
        "device": str,               # GPU name, or "cpu (Triton interpreter)"
        "date": "YYYY-MM-DD", "time_utc": "HH:MM:SS",
        "torch": str, "triton": str, "cuda": str | null, "driver": str | null,
        "probact_gpu": str, "liger_kernel": str | null, "python": str,
        "quick": bool, "command": str
      },
      "copy_gbps": float | null,     # y.copy_(x) on 1 GiB, read + write, same run
      "rows": [{
        "op": str, "pass": "fwd" | "bwd" | "fwd_bwd", "dtype": "bf16" | "fp16" | "fp32",
        "shape": [int, ...],
        "provider": "probact" | "probact_inplace" | "probact_low_memory" | "torch"
                    | "torch_chunked" | "compile" | "liger" | "cce",
        "status": "ok" | "skipped" | "smoke",
        "reason": str | null,        # why skipped (or what the smoke pass saw)
        "ms": float | null, "ms_p20": float | null, "ms_p80": float | null,
        "bytes": int | null,         # minimal-bytes model (null for the linear ops)
        "gbps": float | null, "pct_copy": float | null,
        "tflops": float | null,      # the linear ops only: their 1 or 3 matmuls
        "extra_mib": float | null,   # peak memory above the inputs during one call
        "speedup": float | null,     # probact rows: best non-probact provider's ms / this ms
        "speedup_vs": str | null     # ... and which provider that was
      }, ...]
    }
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from .bytes import COMPUTE_BOUND
from .shapes import label, row_length

SCHEMA = "probact-gpu-bench/1"
# One colour per provider in every panel.
COLORS = {"probact": "tab:blue", "probact_inplace": "tab:cyan", "probact_low_memory": "tab:purple",
          "torch": "tab:orange", "torch_chunked": "tab:brown", "compile": "tab:red",
          "liger": "tab:green", "cce": "tab:olive"}
STATUSES = ("ok", "skipped", "smoke")
DTYPE_NAMES = ("bf16", "fp16", "fp32")


@dataclass
class Row:
    op: str
    pass_: str
    dtype: str
    shape: tuple[int, ...]
    provider: str
    status: str
    reason: str | None = None
    ms: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    bytes: int | None = None
    gbps: float | None = None
    pct_copy: float | None = None
    tflops: float | None = None
    extra_mib: float | None = None
    speedup: float | None = None
    speedup_vs: str | None = None

    @property
    def group(self) -> tuple[str, str, str, tuple[int, ...]]:
        return self.op, self.pass_, self.dtype, self.shape

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Row:
        d = dict(d)
        d["pass_"] = d.pop("pass")
        d["shape"] = tuple(d["shape"])
        return cls(**d)


_ROW_TYPES = {
    "op": str, "pass": str, "dtype": str, "shape": list, "provider": str, "status": str,
    "reason": (str, type(None)), "ms": (float, int, type(None)),
    "ms_p20": (float, int, type(None)), "ms_p80": (float, int, type(None)),
    "bytes": (int, type(None)), "gbps": (float, int, type(None)),
    "pct_copy": (float, int, type(None)), "tflops": (float, int, type(None)),
    "extra_mib": (float, int, type(None)), "speedup": (float, int, type(None)),
    "speedup_vs": (str, type(None)),
}
_ENV_KEYS = ("mode", "device", "date", "time_utc", "torch", "triton", "cuda", "driver",
             "probact_gpu", "liger_kernel", "python", "quick", "command")


def validate(doc: dict) -> None:
    """Raise ValueError naming the first field of ``doc`` that breaks the schema above."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
    env = doc.get("env")
    if not isinstance(env, dict):
        raise ValueError("env must be an object")
    missing = [k for k in _ENV_KEYS if k not in env]
    if missing:
        raise ValueError(f"env lacks {missing}")
    if env["mode"] not in ("cuda", "smoke"):
        raise ValueError(f"env.mode must be 'cuda' or 'smoke', got {env['mode']!r}")
    if not isinstance(doc.get("copy_gbps"), (float, int, type(None))):
        raise ValueError("copy_gbps must be a number or null")
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise ValueError("rows must be a list")
    for i, row in enumerate(rows):
        if set(row) != set(_ROW_TYPES):
            raise ValueError(f"rows[{i}] has keys {sorted(row)}, expected {sorted(_ROW_TYPES)}")
        for key, types in _ROW_TYPES.items():
            if not isinstance(row[key], types) or isinstance(row[key], bool):
                raise ValueError(f"rows[{i}].{key} = {row[key]!r} has the wrong type")
        if row["status"] not in STATUSES:
            raise ValueError(f"rows[{i}].status = {row['status']!r}, expected one of {STATUSES}")
        if row["pass"] not in ("fwd", "bwd", "fwd_bwd"):
            raise ValueError(f"rows[{i}].pass = {row['pass']!r}")
        if row["status"] == "ok" and row["ms"] is None:
            raise ValueError(f"rows[{i}] is ok but has no time")
        if row["status"] != "ok" and row["ms"] is not None:
            raise ValueError(f"rows[{i}] is {row['status']} but carries a time")
        if row["status"] == "skipped" and not row["reason"]:
            raise ValueError(f"rows[{i}] is skipped without a reason")


def to_document(env: dict, copy_gbps: float | None, rows: list[Row]) -> dict:
    doc = {"schema": SCHEMA, "env": env, "copy_gbps": copy_gbps,
           "rows": [r.to_json() for r in rows]}
    validate(doc)
    return doc


def load_json(path: str | os.PathLike) -> tuple[dict, float | None, list[Row]]:
    """Read and validate a results file: (env, copy_gbps, rows)."""
    doc = json.loads(Path(path).read_text())
    validate(doc)
    return doc["env"], doc["copy_gbps"], [Row.from_json(r) for r in doc["rows"]]


# --------------------------------------------------------------------------- environment


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def environment(mode: str, device_name: str, *, quick: bool, command: str) -> dict:
    """Versions and the device, for the top of the markdown and the JSON's ``env``."""
    import torch
    import triton

    from .. import __version__

    try:
        from importlib.metadata import version

        liger = version("liger-kernel")
    except Exception:
        liger = None
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "mode": mode, "device": device_name,
        "date": now.strftime("%Y-%m-%d"), "time_utc": now.strftime("%H:%M:%S"),
        "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "driver": _driver_version() if mode == "cuda" else None,
        "probact_gpu": __version__, "liger_kernel": liger, "python": platform.python_version(),
        "quick": quick, "command": command,
    }


def slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: the results folder of a device."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# --------------------------------------------------------------------------- markdown


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _time(r: Row) -> str:
    if r.status == "smoke":
        return "ran (smoke, untimed)"
    if r.ms is None:
        return "–"
    return f"{r.ms:.3f} ({r.ms_p20:.3f}–{r.ms_p80:.3f})"


def _speedup(r: Row) -> str:
    if r.speedup is None:
        return "–"
    return f"{r.speedup:.2f}× vs {r.speedup_vs}"


def format_table(rows: list[Row]) -> str:
    """One markdown table per op, in run order. The linear ops show TFLOP/s of their matmuls
    instead of GB/s and % of copy."""
    out: list[str] = []
    ops = list(dict.fromkeys(r.op for r in rows))
    for op in ops:
        mine = [r for r in rows if r.op == op]
        compute = op in COMPUTE_BOUND
        rate = "TFLOP/s" if compute else "GB/s | % copy"
        out.append(f"### {op}\n")
        out.append(f"| pass | dtype | shape | provider | ms median (p20–p80) | {rate} | "
                   "extra MiB | speed-up | note |")
        out.append("|" + "---|" * (10 if not compute else 9))
        for r in mine:
            if compute:
                rate_cells = _num(r.tflops, ".1f")
            else:
                rate_cells = f"{_num(r.gbps, ',.0f')} | " + (
                    "–" if r.pct_copy is None else f"{r.pct_copy:.0f} %")
            note = (r.reason or "").replace("|", "/").replace("\n", " ")
            out.append(f"| {r.pass_} | {r.dtype} | {label(r.shape)} | {r.provider} | {_time(r)} | "
                       f"{rate_cells} | {_num(r.extra_mib, ',.0f')} | {_speedup(r)} | {note} |")
        out.append("")
    return "\n".join(out)


def format_header(env: dict, copy_gbps: float | None) -> str:
    lines = ["# probact-gpu bench", ""]
    if env["mode"] == "smoke":
        lines.append("**Smoke pass** (no CUDA device or `--smoke`): each provider ran once on "
                     "tiny shapes; nothing was timed.")
        lines.append("")
    lines += [
        f"- device: {env['device']}" + (f", driver {env['driver']}" if env.get("driver") else ""),
        f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"probact_gpu {env['probact_gpu']}, liger-kernel {env['liger_kernel'] or 'not installed'}",
        f"- measured {env['date']} {env['time_utc']} UTC: `{env['command']}`",
    ]
    if copy_gbps is not None:
        lines.append(f"- copy rate (`y.copy_(x)`, 1 GiB, read + write): {copy_gbps:,.0f} GB/s; "
                     "% copy = GB/s on the minimal-bytes model / this rate")
    lines.append("- ms: `triton.testing.do_bench` median (p20–p80); extra MiB: peak allocated "
                 "above the inputs during one call; speed-up: best other provider's ms / "
                 "probact's ms")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def plot(rows: list[Row], copy_gbps: float | None, path: str | os.PathLike,
         title: str = "") -> bool:
    """GB/s vs row length per provider, one panel per (op, pass, dtype), the copy rate as a
    horizontal line; memory bars per provider for cross-entropy. One PNG at ``path``. Returns
    False (and writes nothing) when matplotlib is missing or no row was timed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [r for r in rows if r.status == "ok"]
    bw_groups = list(dict.fromkeys((r.op, r.pass_, r.dtype) for r in timed if r.gbps is not None))
    mem_groups = list(dict.fromkeys((r.op, r.pass_, r.dtype) for r in timed
                                    if r.op == "cross_entropy" and r.extra_mib is not None))
    panels = [("bw", g) for g in bw_groups] + [("mem", g) for g in mem_groups]
    if not panels:
        return False
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
    for ax, (kind, (op, pass_, dtype)) in zip(axes.flat, panels, strict=False):
        mine = [r for r in timed if (r.op, r.pass_, r.dtype) == (op, pass_, dtype)]
        providers = list(dict.fromkeys(r.provider for r in mine))
        if kind == "bw":
            for p in providers:
                pts = sorted((row_length(op, r.shape), r.gbps) for r in mine
                             if r.provider == p and r.gbps is not None)
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p,
                        color=COLORS.get(p))
            if copy_gbps is not None:
                ax.axhline(copy_gbps, color="k", linestyle="--", linewidth=1, label="copy")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("row length" if op not in ("sigmoid", "bce") else "elements")
            ax.set_ylabel("GB/s (minimal bytes)")
            ax.set_ylim(bottom=0)
            ax.set_title(f"{op} {pass_} {dtype}")
        else:
            shapes = list(dict.fromkeys(r.shape for r in mine))
            width = 0.8 / max(1, len(providers))
            for i, p in enumerate(providers):
                vals = [next((r.extra_mib for r in mine if r.provider == p and r.shape == s), 0.0)
                        for s in shapes]
                ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p,
                       color=COLORS.get(p))
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
            ax.set_xticklabels([f"V={s[-1]}" for s in shapes], rotation=30)
            ax.set_ylabel("peak extra MiB")
            ax.set_title(f"{op} {pass_} {dtype}: memory")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- files


def write_results(out_dir: str | os.PathLike, env: dict, copy_gbps: float | None,
                  rows: list[Row]) -> list[Path]:
    """Write ``<out_dir>/<device-slug>/<date>.{json,md,png}``; return the paths written."""
    folder = Path(out_dir) / slug(env["device"] if env["mode"] == "cuda" else "cpu-smoke")
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / env["date"]
    doc = to_document(env, copy_gbps, rows)
    written = []
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    written.append(json_path)
    png_path = stem.with_suffix(".png")
    has_plot = plot(rows, copy_gbps, png_path, title=f"{env['device']}, {env['date']}")
    md = format_header(env, copy_gbps) + "\n"
    if has_plot:
        md += f"![GB/s vs row length]({png_path.name})\n\n"
    md += format_table(rows)
    md_path = stem.with_suffix(".md")
    md_path.write_text(md)
    written.append(md_path)
    if has_plot:
        written.append(png_path)
    return written


# --------------------------------------------------------------------------- traffic

TRAFFIC_SCHEMA = "probact-gpu-traffic/1"
_TRAFFIC_KEYS = ("op", "pass", "dtype", "shape", "provider", "status", "reason", "run_shape",
                 "path", "minimal", "triton_loaded", "triton_stored", "reread", "torch_bytes",
                 "triton_launches", "torch_launches", "triton_ratio", "total_ratio", "hbm_ratio",
                 "kernels", "kernel_bytes", "allocations", "syncs")


def validate_traffic(doc: dict) -> None:
    """Raise ValueError naming the first field of a ``bench --traffic`` document that breaks
    its schema: ``{"schema", "env" (as the bench's, mode "traffic"), "rows": [...]}``, each row
    with exactly ``_TRAFFIC_KEYS`` (see ``bench/traffic.py``'s ``TrafficRow``)."""
    if doc.get("schema") != TRAFFIC_SCHEMA:
        raise ValueError(f"schema must be {TRAFFIC_SCHEMA!r}, got {doc.get('schema')!r}")
    env = doc.get("env")
    if not isinstance(env, dict) or [k for k in _ENV_KEYS if k not in env]:
        raise ValueError(f"env must be an object with {_ENV_KEYS}")
    if env["mode"] != "traffic":
        raise ValueError(f"env.mode must be 'traffic', got {env['mode']!r}")
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise ValueError("rows must be a list")
    for i, row in enumerate(rows):
        if set(row) != set(_TRAFFIC_KEYS):
            raise ValueError(f"rows[{i}] has keys {sorted(row)}, expected {sorted(_TRAFFIC_KEYS)}")
        if row["status"] not in ("ok", "skipped"):
            raise ValueError(f"rows[{i}].status = {row['status']!r}")
        if row["status"] == "skipped" and not row["reason"]:
            raise ValueError(f"rows[{i}] is skipped without a reason")
        for key in ("kernels", "kernel_bytes", "allocations", "syncs"):
            if not isinstance(row[key], list):
                raise ValueError(f"rows[{i}].{key} must be a list")


def _launch_list(row) -> str:
    """Per phase, each launch in order, Triton kernels (``_kernel`` dropped) with the bytes they
    loaded and stored over the minimal bytes: ``fwd: softmax_fwd 1.50/0.50; bwd: aten.zeros``;
    repeated neighbours as ``×n``."""
    phases: dict[str, list[list]] = {}
    for k in row.kernel_bytes:
        name = k["kernel"].removesuffix("_kernel")
        if "loaded" in k and row.minimal:
            name += f" {k['loaded'] / row.minimal:.2f}/{k['stored'] / row.minimal:.2f}"
        runs = phases.setdefault(k["phase"], [])
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return "; ".join(f"{phase}: " + ", ".join(n + (f" ×{c}" if c > 1 else "") for n, c in runs)
                     for phase, runs in phases.items())


def format_traffic_table(rows) -> str:
    """One markdown table per op: launches, bytes over the minimal-bytes model (Triton alone,
    with torch's kernels, and HBM after the L2 model), re-reads, big allocations."""
    out: list[str] = []
    for op in dict.fromkeys(r.op for r in rows):
        out.append(f"### {op}\n")
        out.append("| pass | dtype | shape (counted at) | provider | path | launches Triton + "
                   "torch | bytes ÷ min: Triton | + torch | HBM (L2 model) | re-read ÷ min | "
                   "allocations ≥ ½ input | launched |")
        out.append("|" + "---|" * 12)
        for r in (r for r in rows if r.op == op):
            if r.status != "ok":
                out.append(f"| {r.pass_} | {r.dtype} | {label(r.shape)} | {r.provider} | – | – "
                           f"| – | – | – | – | – | skipped: {r.reason} |")
                continue
            reread = "–" if not r.minimal else f"{r.reread / r.minimal:.2f}"
            allocs = ", ".join(r.allocations) or "none"
            launched = _launch_list(r).replace("|", "/")
            if r.syncs:
                launched += "; HOST SYNC: " + ", ".join(r.syncs)
            out.append(
                f"| {r.pass_} | {r.dtype} | {label(r.shape)} ({label(r.run_shape)}) | "
                f"{r.provider} | {r.path} | {r.triton_launches} + {r.torch_launches} | "
                f"{_num(r.triton_ratio, '.2f')} | {_num(r.total_ratio, '.2f')} | "
                f"{_num(r.hbm_ratio, '.2f')} | {reread} | {allocs} | {launched} |")
        out.append("")
    return "\n".join(out)


def source_revision() -> str | None:
    """The git commit of the package's checkout (``-dirty`` with uncommitted changes), or None
    for an installed copy: counts depend on the kernels' exact code."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def format_traffic_header(env: dict) -> str:
    source = f" at commit {env['source']}" if env.get("source") else ""
    return "\n".join([
        "# probact-gpu bench --traffic",
        "",
        "**Counted, not timed**: each op ran once through Triton's interpreter at a scaled-down "
        "shape that takes the full shape's launch config (rows fewer, row length and config "
        "kept; `tiling` asked for the full shape on 132 SMs). Ratios are over the minimal-bytes "
        "model at the counted shape (per row, so the full shape's up to per-call constants).",
        "",
        f"- torch {env['torch']}, triton {env['triton']}, probact_gpu {env['probact_gpu']}"
        f"{source}; {env['date']} {env['time_utc']} UTC: `{env['command']}`",
        "- bytes ÷ min, Triton: unmasked lanes of every `tl.load` / `tl.store` × element size; "
        "+ torch: with the torch kernels outside them (each tensor input read once, each output "
        "written once); HBM (L2 model): minus the re-reads an LRU L2 of 50 MB (16 KiB lines; "
        "in flight, resident programs × 132 SMs or a persistent grid's programs) serves at the "
        "full shape",
        "- launched: per phase, each Triton kernel with its bytes loaded/stored ÷ min, then the "
        "torch kernels; re-read: bytes a program loads again after loading them itself; "
        "allocations: new tensors ≥ ½ the input's bytes, in units of it (linear ops: ≥ ½ the "
        "logits, by shape at the counted shape); the linear ops' ratios are – (compute bound, "
        "no bytes model)",
    ]) + "\n"


def traffic_document(env: dict, rows) -> dict:
    doc = {"schema": TRAFFIC_SCHEMA, "env": env, "rows": [r.to_json() for r in rows]}
    validate_traffic(doc)
    return doc


def write_traffic(out: str | os.PathLike, env: dict, rows, appendix: str = "") -> list[Path]:
    """``out`` ending in ``.md``: that file and its ``.json`` beside it; else
    ``<out>/traffic/<date>.{md,json}`` (``appendix``: markdown after the table). Returns the
    paths written."""
    out = Path(out)
    md_path = out if out.suffix == ".md" else out / "traffic" / f"{env['date']}.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path = md_path.with_suffix(".json")
    json_path.write_text(json.dumps(traffic_document(env, rows), indent=1) + "\n")
    md_path.write_text(format_traffic_header(env) + "\n" + format_traffic_table(rows)
                       + ("\n" + appendix if appendix else ""))
    return [json_path, md_path]


__all__ = ["Row", "SCHEMA", "format_header", "format_table", "load_json", "plot", "slug",
           "to_document", "validate", "write_results", "environment", "TRAFFIC_SCHEMA",
           "format_traffic_header", "format_traffic_table", "traffic_document",
           "validate_traffic", "write_traffic"]

"""Every Triton kernel of ``kernels/`` compiles for Hopper (sm_90), checked without a GPU.

The interpreter these tests otherwise run under (``TRITON_INTERPRET=1``, set by conftest.py on
CPU) accepts code the GPU compiler rejects -- plain-float globals in ``@jit`` code, for one. So
``scripts/sm90_report.py --smoke`` runs in a fresh process without ``TRITON_INTERPRET``: the real
launchers run on ``meta`` tensors, each launch is specialised as Triton's launcher would on an
H200 and compiled for ``cuda:90`` by the ptxas shipped in the triton wheel; its cubin is read with
cuobjdump. The full table over every bench shape is ``perf/sm90_static.md``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sm90_report.py"

# Default-tiling specialisations with a stack frame at sm_90 (perf/sm90_static*.md, "Findings"):
# reported as a warning, not asserted. Every other specialisation the smoke run compiles must
# not spill. (The BCE forward that spilled at 32 elements a thread was fixed by
# tiling.choose_bce_config.)
KNOWN_SPILLS = {
    # triton 3.6's ptxas 12.8 only (3.9's does not): 24 B of STL/LDL at 64 registers with both
    # broadcast weights — likely registers saved around the 64-bit division the index terms
    # call; not investigated further.
    ("bce_bwd_kernel", "bf16", "B=4096 W_TERMS=1 PW_TERMS=1 w=8 G_SCALAR"),
}
# Kernels whose global loads are narrow by design: the split combine reads a (rows, splits, 4)
# workspace with stride 4, the invariant merge a (rows, tiles, 2 or 3) one; the probe loads one
# value.
NARROW_LOADS = {"cross_entropy_combine_kernel", "invariant_merge_kernel", "probe_kernel"}


def _nvidia_bin() -> Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "backends" / "nvidia" / "bin"


def _skip_reason() -> str | None:
    bin_dir = _nvidia_bin()
    if bin_dir is None:
        return "triton is not installed"
    if not any((bin_dir / name).is_file() for name in ("ptxas", "ptxas-blackwell")):
        return f"no ptxas in the triton package ({bin_dir}): cannot compile for sm_90 here"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("sm90") / "smoke.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", "-", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.is_file(), f"no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    assert "skipped" not in data, f"ptxas is present but the check was skipped: {data}"
    data["returncode"], data["stderr"] = proc.returncode, proc.stderr
    return data


def _label(row: dict) -> str:
    return f"{row['kernel']} {row['dtype']} [{row['config']}] ({'; '.join(row['cases'])})"


def test_sm90_every_kernel_compiles(report):
    failed = [f"{_label(r)}:\n{r['error']}" for r in report["rows"] if r["error"]]
    assert not failed, "kernels that do not compile for sm_90:\n" + "\n\n".join(failed)
    assert report["returncode"] == 0, report["stderr"][-4000:]


def test_sm90_every_kernel_reached(report):
    """Each ``@triton.jit`` ``*_kernel`` in kernels/*.py is among the compiled ones (read from the
    sources, so a new kernel no smoke case launches fails here)."""
    defined = set()
    for path in (ROOT / "kernels").glob("*.py"):
        defined |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\b", path.read_text()))
    compiled = {r["kernel"] for r in report["rows"]}
    assert defined, "no kernels found in kernels/*.py"
    assert defined <= compiled, f"never compiled: {sorted(defined - compiled)}"


def test_sm90_no_register_spills(report):
    rows = [r for r in report["rows"] if not r["error"]]
    spilling = {(r["kernel"], r["dtype"], r["config"]): r for r in rows if r["spills"]}
    for key in sorted(KNOWN_SPILLS):
        if key in spilling:
            r = spilling[key]
            warnings.warn(f"known sm_90 register spill: {_label(r)}: {r['reg']} registers, "
                          f"{r['stack']} B stack", stacklevel=1)
        elif any((r["kernel"], r["dtype"], r["config"]) == key for r in rows):
            warnings.warn(f"does not spill with triton {report['header']['triton']} "
                          f"({report['header']['ptxas']}): {key}", stacklevel=1)
    new = [f"{_label(r)}: {r['reg']} registers, {r['stack']} B stack, {r['local']} B local"
           for key, r in spilling.items() if key not in KNOWN_SPILLS]
    assert not new, "register spills at sm_90:\n" + "\n".join(new)


def test_sm90_float_arguments_reach_kernels_as_fp64(report):
    """A Python float passed to a kernel is typed fp32 by Triton's launcher unless its parameter
    is annotated ``tl.float64``; the interpreter keeps the Python float. Unannotated, an fp64
    kernel on the GPU computes with its label smoothing, z-loss, transform factors and
    normalizer rounded to fp32 (relative error ~3e-8 where fp64 promises ~1e-16) while the CPU
    tier shows full precision. Every float parameter is therefore annotated, and each kernel
    rounds it once into its math dtype (``kernels/_online.arg_in_math_dtype``)."""
    narrow = [f"{_label(r)}: {', '.join(r['narrow_floats'])}" for r in report["rows"]
              if r.get("narrow_floats")]
    assert not narrow, "float arguments passed as fp32:\n" + "\n".join(narrow)


def test_sm90_contiguous_rows_load_128_bit(report):
    """With Triton's launch-time hints (unit strides constexpr, 16-divisible ints and pointers),
    the kernels read contiguous rows 16 bytes a thread (``LDG.128``, or ``LDGSTS.128``: the
    fused head's GEMM tiles staged by cp.async): a lost alignment hint shows up here."""
    narrow = [f"{_label(r)}: {r['ops']}" for r in report["rows"]
              if not r["error"] and r["kernel"] not in NARROW_LOADS and not r["unaligned"]
              and "LDG.128" not in r["ops"] and "LDGSTS.128" not in r["ops"]]
    assert not narrow, "no 128-bit global load:\n" + "\n".join(narrow)

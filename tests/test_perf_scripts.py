"""The GPU-only perf scripts cannot rot on CPU: their smoke modes run every candidate config
through the interpreter (the sweep) — a config the launchers reject fails here."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_tiling_smoke_runs_every_candidate(interpreter_subprocess):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(ROOT / "perf" / "sweep_tiling.py"), "--smoke"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "configs ran" in out.stdout
    assert int(out.stdout.split("--smoke: ")[1].split()[0]) >= 40

"""The GPU-only perf scripts cannot rot on CPU: their smoke modes run every candidate config
through the interpreter (the sweep) — a config the launchers reject fails here; a bench driver
runs its family's smoke pass; the committed traffic table still parses."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from probact_gpu.bench import report
from probact_gpu.bench.traffic import TrafficRow

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_tiling_smoke_runs_every_candidate(interpreter_subprocess):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(ROOT / "perf" / "sweep_tiling.py"), "--smoke"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "configs ran" in out.stdout
    assert int(out.stdout.split("--smoke: ")[1].split()[0]) >= 40


def test_bench_driver_runs_its_family(interpreter_subprocess, tmp_path):
    """One driver end to end (the others differ only in their --op list)."""
    script, ops = "bench_token_log_probs.py", ["token_log_probs", "linear_token_log_probs"]
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(ROOT / "perf" / script), "--smoke", "--device",
                          "cpu", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = tmp_path.rglob("*.json")
    _, _, rows = report.load_json(path)
    assert sorted({r.op for r in rows}) == sorted(ops)
    assert any(r.provider == "probact" and r.status == "smoke" for r in rows)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not importable")
def test_hf_train_step_smoke(tmp_path):
    """The train-step bench's smoke: one step of a tiny Llama, unpatched and patched, same loss
    (on CUDA when there is one; without it the script picks Triton's interpreter itself)."""
    out = subprocess.run([sys.executable, str(ROOT / "perf" / "bench_hf_train_step.py"),
                          "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nothing was timed" in out.stdout
    doc = json.loads((tmp_path / "hf_train_step.json").read_text())
    assert [r["variant"] for r in doc["rows"]] == ["unpatched", "patched"]
    assert all(r["ms_median"] is None for r in doc["rows"])
    assert abs(doc["rows"][0]["first_loss"] - doc["rows"][1]["first_loss"]) <= 1e-4
    assert "not timed" in (tmp_path / "hf_train_step.md").read_text()


def test_committed_traffic_table_parses():
    """perf/traffic.md's JSON beside it follows the schema, covers every bench op, and no
    counted call makes a host sync."""
    from probact_gpu.bench.shapes import OPS

    doc = json.loads((ROOT / "perf" / "traffic.json").read_text())
    report.validate_traffic(doc)
    rows = [TrafficRow.from_json(r) for r in doc["rows"]]
    assert {r.op for r in rows} == set(OPS)
    assert all(not r.syncs for r in rows)
    assert "# probact-gpu bench --traffic" in (ROOT / "perf" / "traffic.md").read_text()

"""The benchmark harness (``probact_gpu.bench`` and ``probact-gpu bench``), on CPU: the bytes
model, the table writer, the JSON schema, plotting, provider skipping, and a smoke run of the
command itself so it cannot rot. A ``gpu`` test times a small case for real."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from probact_gpu.bench import bytes as bm
from probact_gpu.bench import providers as prov
from probact_gpu.bench import report, runner, shapes
from probact_gpu.bench.report import Row
from probact_gpu.bench.timing import Timing
from probact_gpu.cli import main

ENV = {"mode": "cuda", "device": "NVIDIA H200", "date": "2026-11-28", "time_utc": "12:00:00",
       "torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8", "driver": "570.1",
       "probact_gpu": "0.1.0", "liger_kernel": "0.8.5", "python": "3.11.2", "quick": True,
       "command": "probact-gpu bench --quick"}


def _rows() -> list[Row]:
    """A hand-made result set: two softmax shapes × three providers, one skipped, and CE."""
    rows = []
    for n, times in ((4096, (0.30, 0.45, 0.32)), (262144, (0.31, 0.60, None))):
        shape = (shapes.BUDGET // n, n)
        nbytes = bm.minimal_bytes("softmax", "fwd", shape, 2)
        for provider, ms in zip(("probact", "torch", "liger"), times, strict=True):
            if ms is None:
                rows.append(Row("softmax", "fwd", "bf16", shape, provider, "skipped",
                                reason="raised ValueError: n_cols too large"))
                continue
            gbps = bm.gbps(nbytes, ms)
            rows.append(Row("softmax", "fwd", "bf16", shape, provider, "ok", ms=ms,
                            ms_p20=ms * 0.99, ms_p80=ms * 1.01, bytes=nbytes, gbps=gbps,
                            pct_copy=100 * gbps / 4200.0, extra_mib=512.0))
    for provider, mib in (("probact", 0.5), ("torch", 750.0)):
        rows.append(Row("cross_entropy", "fwd_bwd", "bf16", (4096, 32000), provider, "ok",
                        ms=0.2, ms_p20=0.19, ms_p80=0.21, bytes=10, gbps=1000.0,
                        pct_copy=25.0, extra_mib=mib))
    rows.append(Row("linear_cross_entropy", "fwd_bwd", "bf16", (8192, 4096, 128256), "torch",
                    "ok", ms=37.2, ms_p20=37.0, ms_p80=37.4,
                    tflops=bm.tflops(bm.matmul_flops("fwd_bwd", 8192, 4096, 128256), 37.2),
                    extra_mib=6044.0))
    runner.add_speedups(rows)
    return rows


# --------------------------------------------------------------------------- bytes model


@pytest.mark.parametrize(
    "op, pass_, shape, elem, expected",
    [
        ("softmax", "fwd", (4, 8), 2, 2 * 32 * 2),  # read x, write y
        ("softmax", "bwd", (4, 8), 2, 3 * 32 * 2),  # read y, dy; write dx
        ("log_softmax", "fwd_bwd", (4, 8), 4, 5 * 32 * 4),
        ("sigmoid", "fwd", (10,), 2, 2 * 10 * 2),
        ("sigmoid", "fwd_bwd", (10,), 2, 5 * 10 * 2),
        ("cross_entropy", "fwd_bwd", (4, 100), 2, 2 * 400 * 2 + 12 * 4),  # + targets, lse
        ("cross_entropy", "fwd", (4, 100), 2, 400 * 2 + 8 * 4),
        ("bce", "fwd_bwd", (10,), 2, 3 * 10 * 2),
        ("bce", "fwd", (10,), 4, 2 * 10 * 4),
        ("token_log_probs", "fwd", (4, 100), 2, 400 * 2 + 16 * 4),  # + target, logp, entropy
        ("token_log_probs", "fwd_bwd", (4, 100), 2, 2 * 400 * 2 + 24 * 4),  # + their grads
    ],
)
def test_bytes_model_matches_the_convention(op, pass_, shape, elem, expected):
    assert bm.minimal_bytes(op, pass_, shape, elem) == expected


def test_bytes_model_weights_and_compute_bound_ops():
    assert bm.minimal_bytes("bce", "fwd_bwd", (10,), 2, weighted=True) == 4 * 10 * 2
    assert bm.minimal_bytes("linear_cross_entropy", "fwd_bwd", (8, 4, 16), 2) is None
    assert bm.minimal_bytes("linear_token_log_probs", "fwd", (8, 4, 16), 2) is None
    assert bm.matmul_flops("fwd_bwd", 8192, 4096, 128256) == 3 * 2 * 8192 * 4096 * 128256
    assert bm.matmul_flops("fwd", 2, 3, 5) == 60
    # 512 MiB bf16 softmax forward in 0.25 ms is 4.29 TB/s.
    nbytes = bm.minimal_bytes("softmax", "fwd", (1 << 18, 1024), 2)
    assert nbytes == 1 << 30
    assert bm.gbps(nbytes, 0.25) == pytest.approx(4294.967296)
    assert bm.gbps(nbytes, None) is None


def test_bytes_model_rejects_passes_it_does_not_define():
    assert bm.supported_passes("cross_entropy") == ("fwd", "fwd_bwd")
    with pytest.raises(ValueError, match="no 'bwd' pass"):
        bm.minimal_bytes("cross_entropy", "bwd", (4, 8), 2)
    cases, notes = runner.plan(["cross_entropy", "softmax"], ["bf16"], ["bwd"], "quick")
    assert {c.op for c in cases} == {"softmax"}
    assert notes and "cross_entropy" in notes[0]


def test_shapes_follow_the_bench_table():
    full = shapes.shapes("softmax", "full")
    assert all(m * n == 1 << 28 for m, n in full[:-1])  # fixed 2^28 budget
    assert [n for _, n in full[:-1]] == list(shapes.SOFTMAX_N)
    assert (32, 262144) in full  # few long rows
    assert shapes.shapes("cross_entropy", "full") == [(4096, v) for v in shapes.CE_VOCABS]
    assert shapes.shapes("linear_cross_entropy") == [(8192, 4096, 128256)]
    assert shapes.shapes("token_log_probs") == shapes.shapes("cross_entropy")
    assert shapes.shapes("linear_token_log_probs") == shapes.shapes("linear_cross_entropy")
    for op in shapes.OPS:  # quick is a subset of full, and every quick input is >= 256 MiB bf16
        quick = shapes.shapes(op, "quick")
        assert quick and set(quick) <= set(shapes.shapes(op, "full"))
        if op not in shapes.LINEAR_OPS:  # few long rows are small by design
            big = [s for s in quick if s != shapes.FEW_ROWS]
            assert all(torch.Size(s).numel() * 2 >= 250 * 2**20 for s in big), op


# --------------------------------------------------------------------------- report


def test_speedup_is_best_other_over_probact():
    rows = _rows()
    small = [r for r in rows if r.op == "softmax" and r.shape[1] == 4096]
    ours = next(r for r in small if r.provider == "probact")
    assert ours.speedup == pytest.approx(0.32 / 0.30) and ours.speedup_vs == "liger"
    long_row = next(r for r in rows if r.shape == (1024, 262144) and r.provider == "probact")
    assert long_row.speedup == pytest.approx(0.60 / 0.31) and long_row.speedup_vs == "torch"
    assert all(r.speedup is None for r in rows if r.provider != "probact")


def test_markdown_table():
    rows = _rows()
    text = report.format_table(rows)
    assert "### softmax" in text and "### linear_cross_entropy" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("| fwd | bf16 | 65536×4096 |")]
    assert len(lines) == 3
    ours = next(ln for ln in lines if "| probact |" in ln)
    cells = [c.strip() for c in ours.strip("|").split("|")]
    # pass, dtype, shape, provider, ms, GB/s, % copy, MiB, speed-up, note
    assert cells[4] == "0.300 (0.297–0.303)"
    assert cells[5] == "3,579" and cells[6] == "85 %"
    assert cells[7] == "512" and cells[8] == "1.07× vs liger"
    skipped = next(ln for ln in text.splitlines() if "| liger |" in ln and "262144 |" in ln)
    assert "raised ValueError: n_cols too large" in skipped
    lce = next(ln for ln in text.splitlines() if ln.startswith("| fwd_bwd | bf16 | 8192×4096"))
    assert "| 694.1 |" in lce  # TFLOP/s of the three matmuls
    for block in text.split("###")[1:]:  # every row has as many cells as its header
        table = [ln for ln in block.splitlines() if ln.startswith("|")]
        assert len({ln.count("|") for ln in table}) == 1
    header = report.format_header(ENV, 4230.0)
    assert "NVIDIA H200, driver 570.1" in header and "torch 2.11.0" in header
    assert "triton 3.6.0" in header and "4,230 GB/s" in header


def test_json_round_trip(tmp_path):
    rows = _rows()
    doc = report.to_document(ENV, 4230.0, rows)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    env, copy_gbps, back = report.load_json(path)
    assert env == ENV and copy_gbps == 4230.0 and back == rows
    assert doc["rows"][0]["pass"] == "fwd" and doc["rows"][0]["shape"] == [65536, 4096]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema="other/1"), "schema"),
        (lambda d: d["env"].pop("driver"), "env lacks"),
        (lambda d: d["rows"][0].update(ms="fast"), "rows\\[0\\].ms"),
        (lambda d: d["rows"][0].update(status="done"), "status"),
        (lambda d: d["rows"][5].update(reason=None), "without a reason"),
        (lambda d: d["rows"][5].update(ms=1.0), "carries a time"),
        (lambda d: d["rows"][0].pop("gbps"), "has keys"),
    ],
)
def test_json_schema_rejects(mutate, message):
    doc = json.loads(json.dumps(report.to_document(ENV, 4230.0, _rows())))
    assert doc["rows"][5]["status"] == "skipped"
    mutate(doc)
    with pytest.raises(ValueError, match=message):
        report.validate(doc)


def test_plot_and_files(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _rows()
    written = report.write_results(tmp_path, ENV, 4230.0, rows)
    folder = tmp_path / "nvidia-h200"
    assert sorted(p.name for p in written) == ["2026-11-28.json", "2026-11-28.md",
                                                "2026-11-28.png"]
    png = (folder / "2026-11-28.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (folder / "2026-11-28.md").read_text()
    assert md.startswith("# probact-gpu bench") and "![GB/s vs row length](2026-11-28.png)" in md
    assert report.load_json(folder / "2026-11-28.json")[2] == rows
    # Nothing timed: no plot, and the markdown does not link one.
    smoke = [Row("softmax", "fwd", "bf16", (4, 64), "torch", "smoke", reason="fwd ran")]
    env = dict(ENV, mode="smoke", device="cpu (Triton interpreter)")
    assert not report.plot(smoke, None, tmp_path / "none.png")
    written = report.write_results(tmp_path, env, None, smoke)
    assert [p.name for p in written] == ["2026-11-28.json", "2026-11-28.md"]
    assert "Smoke pass" in (tmp_path / "cpu-smoke" / "2026-11-28.md").read_text()


def test_slug():
    assert report.slug("NVIDIA H200") == "nvidia-h200"
    assert report.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# --------------------------------------------------------------------------- providers


def test_bench_ops_are_the_registry_s():
    from probact_gpu import registry

    assert shapes.OPS == registry.bench_ops()
    for op in shapes.OPS:  # every bench op has shapes, a bytes model, inputs and a torch path
        assert shapes.shapes(op, "smoke") and bm.supported_passes(op)
        assert op in prov.PUBLIC_NAMES and op in prov.TORCH_FNS and op in prov.GRAD_INPUTS


def test_missing_probact_op_is_a_skip(monkeypatch):
    with pytest.raises(prov.Skip, match="has no softmax"):
        prov.probact_fn("softmax", module="probact_gpu.testing")
    with pytest.raises(prov.Skip, match="not importable"):
        prov.probact_fn("softmax", module="probact_gpu.no_such_module")
    assert prov.probact_fn("softmax") is __import__("probact_gpu").functional.softmax
    # A public name whose lazy import fails (its module mid-change) is a skip with the reason.
    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise ImportError(f"cannot import name {name!r}")

    monkeypatch.setitem(sys.modules, "broken_probact", Broken("broken_probact"))
    with pytest.raises(prov.Skip, match="broken_probact.linear_token_log_probs not importable"):
        prov.probact_fn("linear_token_log_probs", module="broken_probact")


def test_peer_providers_skip_with_the_reason(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(prov.Skip, match="needs a CUDA device"):
        prov.resolve("cce", "linear_cross_entropy", device=cpu)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    with pytest.raises(prov.Skip, match="cut-cross-entropy not importable"):
        prov.cce_fn("linear_cross_entropy")
    with pytest.raises(prov.Skip, match="has no softmax"):
        prov.cce_fn("softmax")
    with pytest.raises(prov.Skip, match="LM-head path"):
        prov.resolve("torch_chunked", "softmax", device=cpu)
    with pytest.raises(ValueError, match="unknown provider"):
        prov.resolve("nobody", "softmax", device=cpu)


def test_lm_head_torch_paths_agree(monkeypatch, device):
    """The chunked torch path is the unfused one over token chunks; ignored tokens are 0."""
    monkeypatch.setattr(prov, "CHUNK_TOKENS", 5)
    inputs = prov.make_inputs("token_log_probs", (16, 50), torch.float32, device)
    logp, entropy = prov.TORCH_FNS["token_log_probs"](*inputs.values())
    for a, b in zip((logp, entropy), prov.CHUNKED_FNS["token_log_probs"](*inputs.values()),
                    strict=True):
        torch.testing.assert_close(a, b)
    ignored = inputs["target"] == prov.IGNORE_INDEX
    assert ignored.any() and (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    ref = torch.log_softmax(inputs["logits"], -1)
    kept = ~ignored
    torch.testing.assert_close(logp[kept], ref[kept].gather(-1, inputs["target"][kept, None])[:, 0])
    lin = prov.make_inputs("linear_token_log_probs", (12, 8, 30), torch.float32, device)
    for a, b in zip(prov.TORCH_FNS["linear_token_log_probs"](*lin.values()),
                    prov.CHUNKED_FNS["linear_token_log_probs"](*lin.values()), strict=True):
        torch.testing.assert_close(a, b)
    step = prov.build_step(prov.CHUNKED_FNS["token_log_probs"], "token_log_probs", "fwd_bwd",
                           inputs)
    step.run()
    assert inputs["logits"].grad.shape == inputs["logits"].shape
    with pytest.raises(ValueError, match="no separate bwd"):
        prov.build_step(prov.TORCH_FNS["token_log_probs"], "token_log_probs", "bwd", inputs)


def test_liger_unimportable_or_without_the_op_is_a_skip(monkeypatch):
    with pytest.raises(prov.Skip, match="has no sigmoid"):
        prov.liger_fn("sigmoid")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import raises ImportError
    for op in ("softmax", "cross_entropy", "linear_cross_entropy"):
        with pytest.raises(prov.Skip, match="liger-kernel not importable"):
            prov.liger_fn(op)
    with pytest.raises(prov.Skip, match="needs a CUDA device"):
        prov.resolve("liger", "softmax", device=torch.device("cpu"))


def test_skipped_and_raising_providers_become_rows(device):
    case = runner.Case("softmax", "fwd", "fp32", (2, 16))

    def resolve(provider, op, *, device, smoke):
        if provider == "missing":
            raise prov.Skip("not here")
        if provider == "raising":
            def boom(x):
                raise ValueError("cap is 65536\nsecond line")
            return boom
        return prov.resolve(provider, op, device=device, smoke=smoke)

    rows = [runner.run_case(case, p, device, smoke=True, copy_gbps=None, resolve=resolve)
            for p in ("missing", "raising", "torch")]
    assert [(r.status, r.reason) for r in rows[:2]] == [
        ("skipped", "not here"), ("skipped", "raised ValueError: cap is 65536")]
    assert rows[2].status == "smoke" and rows[2].ms is None
    assert "output vs torch: max abs diff 0.0e+00" in rows[2].reason


def test_compile_provider_wraps_torch(device):
    fn = prov.compiled_fn("softmax", backend="eager")  # inductor would take minutes on 2 cores
    x = prov.make_inputs("softmax", (3, 7), torch.float32, device)["x"]
    torch.testing.assert_close(fn(x), torch.softmax(x, -1))
    with pytest.raises(prov.Skip, match="smoke"):
        prov.resolve("compile", "softmax", device=device, smoke=True)


def test_inputs_are_random_with_ignored_targets(device):
    ce = prov.make_inputs("cross_entropy", (64, 50), torch.bfloat16, device)
    target = ce["target"]
    assert (target == prov.IGNORE_INDEX).sum().item() == 64 // 8
    kept = target[target != prov.IGNORE_INDEX]
    assert kept.min().item() >= 0 and kept.max().item() < 50
    assert ce["logits"].std().item() == pytest.approx(1.0, abs=0.1)
    lce = prov.make_inputs("linear_cross_entropy", (32, 64, 100), torch.float32, device)
    logits = lce["x"] @ lce["weight"].t()
    assert logits.std().item() == pytest.approx(1.0, abs=0.2)  # unit-variance logits
    bce = prov.make_inputs("bce", (100,), torch.float32, device)
    assert 0 <= bce["target"].min().item() and bce["target"].max().item() <= 1
    again = prov.make_inputs("cross_entropy", (64, 50), torch.bfloat16, device)
    assert torch.equal(again["logits"], ce["logits"])  # seeded


@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd_bwd"])
def test_steps_compute_the_pass(device, pass_):
    inputs = prov.make_inputs("softmax", (3, 5), torch.float32, device)
    step = prov.build_step(prov.TORCH_FNS["softmax"], "softmax", pass_, inputs)
    out = step.run()
    x = inputs["x"]
    if pass_ == "fwd":
        torch.testing.assert_close(out, torch.softmax(x, -1))
        assert not x.requires_grad
    elif pass_ == "bwd":
        assert out[0].shape == x.shape and x.grad is None
    else:
        first = x.grad.clone()
        step.run()  # gradients do not accumulate across timed calls
        torch.testing.assert_close(x.grad, first)
        step.reset()
        assert x.grad is None


# --------------------------------------------------------------------------- the command


def test_cli_smoke_run(tmp_path, capsys, device):
    """`probact-gpu bench --smoke` end to end on tiny shapes: every op family, table and files."""
    code = main(["bench", "--smoke", "--device", device.type, "--op", "all",
                 "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert code == 0
    if device.type == "cpu":
        assert "no CUDA device" in text
    assert "### softmax" in text and "ran (smoke, untimed)" in text
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1
    env, copy_gbps, rows = report.load_json(files[0])
    assert env["mode"] == "smoke" and copy_gbps is None
    assert {r.op for r in rows} == set(shapes.OPS)
    assert all(r.ms is None for r in rows)  # a smoke pass is never timed
    by = {(r.op, r.pass_, r.shape, r.provider): r for r in rows}
    assert by[("softmax", "fwd", (4, 64), "probact")].status == "smoke"
    assert by[("softmax", "fwd_bwd", (3, 3000), "probact")].status == "smoke"
    assert by[("softmax", "fwd", (4, 64), "compile")].status == "skipped"
    for r in rows:
        assert r.status in ("smoke", "skipped") and (r.status == "smoke" or r.reason)
        if r.provider == "torch":
            assert r.status == "smoke", r
    fwd = [r for r in rows if r.status == "smoke" and r.pass_ == "fwd"]
    assert fwd and all("output vs torch: max abs diff" in r.reason for r in fwd)
    both = [r for r in rows if r.status == "smoke" and r.pass_ == "fwd_bwd"]
    assert both and all("gradients vs torch: max abs diff" in r.reason for r in both)
    exact = by[("softmax", "fwd", (4, 64), "torch")].reason  # torch against itself
    assert "max abs diff 0.0e+00" in exact


@pytest.mark.gpu
def test_bench_times_a_case_on_cuda():
    """A real measurement of a small case: copy rate, time, GB/s, % of copy, extra memory."""
    dev = torch.device("cuda")
    copy_gbps, t = runner.copy_rate(dev, nbytes=1 << 28, warmup_ms=5, rep_ms=20)
    assert copy_gbps > 100 and t.p20 <= t.ms <= t.p80
    case = runner.Case("softmax", "fwd", "bf16", (4096, 4096))
    for provider in ("probact", "torch"):
        row = runner.run_case(case, provider, dev, smoke=False, copy_gbps=copy_gbps,
                              warmup_ms=5, rep_ms=20)
        assert row.status == "ok", row.reason
        assert row.ms > 0 and row.gbps > 0 and row.pct_copy > 0
        assert row.bytes == 2 * 4096 * 4096 * 2
        assert row.extra_mib >= 32 - 1e-6  # at least the 32 MiB output


def test_interrupt_keeps_the_rows_measured(device):
    """A timeout's SIGTERM (raised as KeyboardInterrupt by the CLI) stops the run, keeping rows."""
    calls = []

    def resolve(provider, op, *, device, smoke):
        calls.append(provider)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return prov.TORCH_FNS[op]

    lines = []

    class Out:
        def write(self, s):
            lines.append(s)

    copy_gbps, rows, complete = runner.run(ops=["softmax"], dtypes=["fp32"], passes=["fwd"],
                                           size="smoke", device=device, resolve=resolve,
                                           out=Out())
    assert not complete and copy_gbps is None
    assert [r.status for r in rows] == ["smoke", "smoke"]
    assert "interrupted after 2 of" in "".join(lines)


def test_timed_row_arithmetic(device, monkeypatch):
    """The timed path of run_case with the clock stubbed (CPU has no real timing): GB/s, % of
    copy and TFLOP/s come from the bytes model and the median."""
    monkeypatch.setattr(runner, "measure", lambda fn, **kw: Timing(2.0, 1.9, 2.1))
    monkeypatch.setattr(runner, "peak_extra_mib", lambda fn, dev: 3.0)
    row = runner.run_case(runner.Case("softmax", "fwd_bwd", "fp32", (4, 1000)), "torch", device,
                          smoke=False, copy_gbps=0.05)
    assert row.status == "ok" and (row.ms, row.ms_p20, row.ms_p80) == (2.0, 1.9, 2.1)
    assert row.bytes == 5 * 4000 * 4 and row.extra_mib == 3.0
    assert row.gbps == pytest.approx(80000 / 2e-3 / 1e9)
    assert row.pct_copy == pytest.approx(100 * row.gbps / 0.05)
    lce = runner.run_case(runner.Case("linear_cross_entropy", "fwd_bwd", "fp32", (8, 16, 32)),
                          "torch", device, smoke=False, copy_gbps=0.05)
    assert lce.status == "ok" and lce.bytes is None and lce.gbps is None
    assert lce.tflops == pytest.approx(6 * 8 * 16 * 32 / 2e-3 / 1e12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["check", "bench"])
def test_cli_device_cuda_without_cuda_is_a_one_line_error(command, monkeypatch):
    """`--device cuda` where torch sees no CUDA device ends at once with one line naming the
    option, not a traceback from deep inside the first launch."""
    from probact_gpu import check

    def nothing_runs(*args, **kwargs):
        raise AssertionError("work started before the device was checked")

    monkeypatch.setattr(check, "run", nothing_runs)
    monkeypatch.setattr(runner, "run", nothing_runs)
    with pytest.raises(SystemExit) as exc:
        main([command, "--device", "cuda", "--op", "softmax"])
    message = str(exc.value.code)
    assert "--device cuda" in message and "no CUDA device" in message
    assert "\n" not in message


@pytest.mark.parametrize("extra", [[], ["--traffic"]])
def test_bench_out_that_cannot_be_created_fails_before_the_bench(tmp_path, monkeypatch, extra):
    """`bench --out PATH` checks PATH can be written before running anything (it once ran the
    whole bench, then failed writing the results)."""
    from probact_gpu.bench import traffic

    def nothing_runs(*args, **kwargs):
        raise AssertionError("the bench ran before --out was checked")

    monkeypatch.setattr(runner, "run", nothing_runs)
    monkeypatch.setattr(traffic, "run", nothing_runs)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker / "results", blocker):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--smoke", "--device", "cpu", "--op", "softmax", *extra,
                  "--out", str(out)])
        message = str(exc.value.code)
        assert "--out" in message and str(blocker) in message and "\n" not in message


def test_invariant_and_liger_lm_head_providers(monkeypatch, device):
    """``probact_invariant`` calls the public function with ``batch_invariant=True`` (its
    log-probs equal the invariant op's); Liger's log-prob head is a skip that says why when the
    installed Liger has none (or no Liger at all)."""
    import probact_gpu as pg

    fn = prov.resolve("probact_invariant", "token_log_probs", device=device)
    inputs = prov.make_inputs("token_log_probs", (8, 100), torch.float32, device, 0)
    logp, entropy = fn(*inputs.values())
    assert torch.equal(logp, pg.token_log_probs(*inputs.values(), batch_invariant=True))
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(prov.Skip, match="liger-kernel not importable"):
        prov.liger_fn("linear_token_log_probs")
    fake = types.ModuleType("liger_kernel.transformers.functional")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", fake)
    monkeypatch.setattr(prov, "_import", lambda name: fake)
    with pytest.raises(prov.Skip, match="no log-prob"):
        prov.liger_fn("linear_token_log_probs")

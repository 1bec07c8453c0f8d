"""The benchmark code cannot rot: the smoke preset end to end, the run-file schema, the summary, plots and compare.

The smoke run goes through a subprocess (``entangle-fast bench --preset smoke``): the suites run under their own
``pytest.main``, which must not share this test session's modules. Timings are never asserted, only their shape.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from entangle_fast import bench
from entangle_fast.commands import bench as bench_cmd

ROOT = Path(__file__).resolve().parents[1]
# Runs the subcommand module directly, so the test does not depend on how cli.py lists it.
RUN_COMMAND = ("import argparse, sys\nfrom entangle_fast.commands import bench\n"
               "p = argparse.ArgumentParser(); bench.configure(p)\nsys.exit(bench.run(p.parse_args(sys.argv[1:])))")
LOGPROB_IMPLS = {"ours-torch", "ours-triton", "reference", "trl", "torch-lce", "cce", "liger"}
STATS_IMPLS = {"stats-off", "stats-on", "reference", "stats-only", "loop", "lm-head-matmul"}
MACHINE = {"cpu": "test cpu", "cores": 2, "torch_threads": 2, "gpu": None, "torch": "2.x", "triton": None,
           "cuda": None, "python": "3.11", "platform": "test"}


def _env() -> dict:
    # The suites time real runs: no Triton interpreter (tests/conftest.py sets it for the kernel tests).
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run([sys.executable, "-c", RUN_COMMAND, "--preset", "smoke", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert proc.returncode == 0, f"smoke run failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    (json_path,) = out.glob("*.json")
    return proc, out, json.loads(json_path.read_text())


def test_smoke_run_writes_json_summary_and_plots(smoke):
    proc, out, _ = smoke
    written = [Path(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("wrote ")]
    assert {p.suffix for p in written} == {".json", ".md", ".png"}, proc.stdout
    assert all(p.is_file() and p.parent == out for p in written), proc.stdout
    pngs = [p for p in written if p.suffix == ".png"]
    assert sorted(p.name.rsplit("-", 1)[1] for p in pngs) == ["memory.png", "rounds.png", "time.png"], proc.stdout
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "smoke" in written[0].name and written[0].name.startswith("cpu-" if not torch.cuda.is_available() else "")
    assert "## Headline ratios" in next(p for p in written if p.suffix == ".md").read_text()


def test_smoke_run_is_valid_and_complete(smoke):
    _, _, run = smoke
    assert bench.check_run(run) == []
    assert run["preset"] == "smoke" and not run["failed"]
    ran = {(r["kind"], r["impl"]) for r in run["results"]}
    skipped = {(s["kind"], s["impl"]): s["reason"] for s in run["skipped"]}
    for impl in LOGPROB_IMPLS:  # every peer is measured or skipped with its reason, never dropped
        assert ("logprobs", impl) in ran or skipped.get(("logprobs", impl)), impl
    assert {("token_stats", i) for i in STATS_IMPLS} <= ran
    assert ("matmul", "matmul") in ran and run["ceiling"]
    assert {("monitor", m) for m in ("off", "exact", "sketch", "explicit")} <= ran
    for r in (r for r in run["results"] if r["kind"] in ("logprobs", "token_stats", "matmul")):
        assert r["time_ms"] > 0 and r["rounds"] == 1 and len(r["samples_ms"]) == 1, r["id"]
        assert r["memory_error"] is None and r["peak_memory_bytes"] >= 0, (r["id"], r["memory_error"])
        assert r["environment"]["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert "needs a CUDA device" in skipped[("logprobs", "ours-triton")]
    names = {r["name"] for r in run["ratios"]}
    assert f"{run['ours_auto']} / reference time" in names
    assert {"stats-on / stats-off time", "per-token loop / stats-only time (speed-up)"} <= names
    assert {"exact / off step time", "sketch / off step time", "explicit / off step time"} <= names


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip of the GPU preset where no GPU is visible")
def test_gpu_preset_is_skipped_with_its_reason_on_cpu():
    suites = ["benchmarks/test_bench_logprobs.py", "benchmarks/test_bench_token_stats.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", *suites, "--bench-preset", "gpu", "-q", "-rs",
                           "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "passed" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
    assert "runs on CUDA only and no CUDA device is visible" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic runs: schema, ratios, summary, plots and compare without running anything.


def _result(kind, impl, pass_, params, time_ms, mib, dtype="float32"):
    shape = "-".join(f"{k}{v}" for k, v in params.items())
    if kind == "matmul":
        flops = 2 * params["m"] * params["k"] * params["n"]
    else:
        flops = 8 * params.get("rows", 2 * params.get("pairs", 0)) * params["seq"] * params["vocab"] * params["hidden"]
    return {"id": f"{kind}-{pass_}-{impl}-{shape}", "kind": kind, "group": f"{kind}:{pass_} [{shape}]", "impl": impl,
            "pass": pass_, "shape": shape, "shape_params": {**params, "dtype": dtype}, "dtype": dtype,
            "device": "cpu", "time_ms": float(time_ms), "time_ms_min": float(time_ms), "time_ms_max": float(time_ms),
            "rounds": 1, "samples_ms": [float(time_ms)], "timer": "perf-counter",
            "peak_memory_bytes": int(mib * 2**20), "memory_method": "linux-vmhwm", "memory_error": None,
            "flops": flops, "tflops": flops / (time_ms * 1e-3) / 1e12}


def _synthetic_run(scale: float = 1.0) -> dict:
    results = []
    for seq in (64, 128):  # a sequence-length sweep, so the plots have lines
        lp = {"rows": 2, "seq": seq, "hidden": 16, "vocab": 64}
        results += [_result("logprobs", "ours-torch", "full", lp, 10 * scale * seq / 64, 100),
                    _result("logprobs", "reference", "full", lp, 40 * scale * seq / 64, 400 * seq / 64)]
    st = {"pairs": 1, "seq": 8, "hidden": 16, "vocab": 64}
    results += [_result("token_stats", i, p, st, t * scale, m) for i, p, t, m in (
        ("stats-off", "full", 10, 50), ("stats-on", "full", 12, 60), ("lm-head-matmul", "forward", 4, 10),
        ("stats-only", "stats", 5, 20), ("loop", "stats", 1000, 2000))]
    results.append(_result("matmul", "matmul", "forward", {"m": 64, "k": 64, "n": 64}, 1 * scale, 1))
    step = {"label": "tiny", "pairs": 2, "seq": 8, "hidden": 16, "vocab": 64}
    for mode, t, m in (("off", 100, 50), ("exact", 110, 55), ("sketch", 104, 52), ("explicit", 300, 400)):
        results.append({**_result("monitor", mode, "step", step, t * scale, m), "flops": None, "tflops": None})
    for impl, t, m in (("trl", 200, 500), ("entangled_off", 140, 280), ("entangled", 150, 300)):
        results.append({**_result("trainer", impl, "train_step", step, t * scale, m), "flops": None, "tflops": None})
    skipped = [{"id": "logprobs-full-liger-x", "kind": "logprobs", "impl": "liger", "pass": "full", "shape": "x",
                "reason": "liger: liger-kernel is not installed (pip install liger-kernel)"}]
    return bench.build_run("cpu", results, skipped, [], machine=dict(MACHINE), created="2025-01-01T00:00:00+00:00")


def _ratio(run, name, shape_part=""):
    return next(r["value"] for r in run["ratios"] if r["name"] == name and shape_part in r["shape"])


def test_check_run_names_each_problem(tmp_path):
    run = _synthetic_run()
    assert bench.check_run(run) == []
    broken = json.loads(json.dumps(run))
    del broken["results"][0]["time_ms"]
    broken["ratios"][0]["value"] = "fast"
    broken["skipped"][0].pop("reason")
    problems = bench.check_run(broken)
    assert any("results[0]: missing key 'time_ms'" in p for p in problems), problems
    assert any("ratios[0].value" in p for p in problems), problems
    assert any("skipped[0]: missing key 'reason'" in p for p in problems), problems
    assert bench.check_run({"preset": "cpu"})  # not a run at all
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="not a benchmark run"):
        bench.load_run(bad)
    with pytest.raises(FileNotFoundError):
        bench.load_run(tmp_path / "missing.json")


def test_ratios_summary_and_plots_from_synthetic_results(tmp_path):
    run = _synthetic_run()
    assert _ratio(run, "ours-torch / reference time", "seq64") == pytest.approx(0.25)
    assert _ratio(run, "reference / ours-torch peak memory", "seq128") == pytest.approx(8.0)
    grads = (2 * 128 + 64) * 16 * 4  # hidden [N, d] and weight [V, d] gradients, fp32
    assert _ratio(run, "reference / ours-torch working memory", "seq128") == pytest.approx(
        (800 * 2**20 - grads) / (100 * 2**20 - grads))
    assert _ratio(run, "stats-on / stats-off time") == pytest.approx(1.2)
    assert _ratio(run, "(stats-on - stats-off) / LM-head matmul time") == pytest.approx(0.5)
    assert _ratio(run, "per-token loop / stats-only time (speed-up)") == pytest.approx(200)
    assert _ratio(run, "exact / off step time") == pytest.approx(1.1)
    assert _ratio(run, "sketch / off peak memory") == pytest.approx(52 / 50)
    assert _ratio(run, "two-extra-backward overhead / exact overhead") == pytest.approx(20)
    assert _ratio(run, "two-extra-backward overhead / sketch overhead") == pytest.approx(50)
    assert _ratio(run, "entangled / trl time per step") == pytest.approx(0.75)
    assert _ratio(run, "trl / entangled peak memory") == pytest.approx(500 / 300)
    assert run["ceiling"]["float32"] == pytest.approx(2 * 64**3 / 1e-3 / 1e12)
    matmul = next(r for r in run["results"] if r["kind"] == "matmul")
    assert matmul["ceiling_fraction"] == pytest.approx(1.0)
    text = bench.summary_markdown(run)
    assert "| logprobs | rows2-seq64-hidden16-vocab64 | full | ours-torch / reference time | 0.25 | lower |" in text
    assert "liger-kernel is not installed" in text and "cpu-2core" in text
    plots = bench.plot_run(run, tmp_path / "synthetic")
    assert [p.name for p in plots][:2] == ["synthetic-time.png", "synthetic-memory.png"]
    assert all(p.stat().st_size > 1000 for p in plots)
    # Only what the run measured is plotted: no log-prob figures without log-prob results, no rounds figure without
    # side-by-side ratios.
    monitor_only = dict(run, results=[r for r in run["results"] if r["kind"] in ("monitor", "trainer")])
    assert bench.plot_run(monitor_only, tmp_path / "unpaired") == []
    for r, rounds in zip(monitor_only["results"], ([100.0, 90.0, 120.0], [110.0, 99.0, 150.0])):  # off, exact
        r.update(side_by_side=True, samples_ms=rounds)
    ratios = {d.name: d for d in bench.suite_ratios()}
    impls = {r["impl"]: r for r in monitor_only["results"][:2]}
    assert bench.round_ratios(ratios["exact / off step time"], impls) == pytest.approx([1.1, 1.1, 1.25])
    assert [p.name for p in bench.plot_run(monitor_only, tmp_path / "monitor")] == ["monitor-rounds.png"]
    assert bench.plot_run(dict(run, results=[]), tmp_path / "empty") == []


def test_compare_two_synthetic_run_files(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_synthetic_run(1.0)))
    b.write_text(json.dumps(_synthetic_run(0.5)))
    cmp = bench.compare(a, b)
    assert len(cmp["measurements"]) == 17  # 4 log-prob, 5 token-stats, 1 matmul, 4 monitor, 3 trainer
    assert all(r["time_b_over_a"] == pytest.approx(0.5) for r in cmp["measurements"])
    assert all(r["memory_b_over_a"] == pytest.approx(1.0) for r in cmp["measurements"])
    same = [r for r in cmp["ratios"] if r["name"] == "ours-torch / reference time"]
    assert same and all(r["b_over_a"] == pytest.approx(1.0) for r in same)
    parser = argparse.ArgumentParser()
    bench_cmd.configure(parser)
    assert bench_cmd.run(parser.parse_args(["--compare", str(a), str(b)])) == 0
    printed = capsys.readouterr().out
    assert "B/A time" in printed and "| 0.5 |" in printed
    not_a_run = tmp_path / "c.json"
    not_a_run.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match="not a benchmark run"):
        bench.compare(a, not_a_run)

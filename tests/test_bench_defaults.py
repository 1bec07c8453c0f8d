"""Where `entangle-fast bench` writes by default, and smoke runs labelled as no measurement (JSON field, Markdown)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from entangle_fast import bench

ROOT = Path(__file__).resolve().parents[1]
RUN_COMMAND = ("import argparse, sys\nfrom entangle_fast.commands import bench\n"
               "p = argparse.ArgumentParser(); bench.configure(p)\nsys.exit(bench.run(p.parse_args(sys.argv[1:])))")
MACHINE = {"cpu": "test cpu", "cores": 2, "torch_threads": 2, "gpu": None, "torch": "2.x", "triton": None,
           "cuda": None, "python": "3.11", "platform": "test"}
RESULT = {"id": "matmul-forward-matmul-m8", "kind": "matmul", "group": "matmul:forward [m8]", "impl": "matmul",
          "pass": "forward", "shape": "m8", "shape_params": {"m": 8, "dtype": "float32"}, "dtype": "float32",
          "device": "cpu", "time_ms": 0.5, "time_ms_min": 0.5, "time_ms_max": 0.5, "rounds": 1, "samples_ms": [0.5],
          "timer": "perf-counter", "peak_memory_bytes": 1024, "memory_method": "linux-vmhwm", "memory_error": None,
          "flops": 1024, "tflops": 1e-6}


def test_default_folder_is_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = bench.default_results_dir()
    assert out == tmp_path / "entangle-bench"
    assert Path(bench.__file__).resolve().parent.parent not in out.resolve().parents


def _run(preset: str) -> dict:
    return bench.build_run(preset, [dict(RESULT)], [], [], machine=dict(MACHINE), created="2025-01-01T00:00:00+00:00")


def test_smoke_runs_are_labelled_not_a_measurement():
    smoke, cpu = _run("smoke"), _run("cpu")
    assert bench.check_run(smoke) == [] and bench.check_run(cpu) == []
    assert smoke["label"] == "smoke: not a measurement" and cpu["label"] is None
    md = bench.summary_markdown(smoke).splitlines()
    assert md[0].endswith("(smoke: not a measurement)")
    headline = md.index("## Headline ratios")
    assert md[headline + 2].startswith("**smoke: not a measurement**")
    assert "not a measurement" not in bench.summary_markdown(cpu)
    assert "smoke: not a measurement" in bench.compare(smoke, cpu)["a"]


def test_cli_writes_into_the_working_directory_by_default(tmp_path):
    """The real command with no --out, a keyword that selects no case (nothing runs, files are still written)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    committed = ROOT / "benchmarks" / "results"
    before = sorted(committed.iterdir()) if committed.is_dir() else []
    proc = subprocess.run([sys.executable, "-c", RUN_COMMAND, "--preset", "smoke", "-k", "no_such_case_xyz",
                           "--no-progress"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    written = [Path(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("wrote ")]
    assert written and all(p.parent == tmp_path / "entangle-bench" for p in written), proc.stdout + proc.stderr
    assert "(smoke: not a measurement)" in proc.stdout.splitlines()[0]
    run = json.loads(next(p for p in written if p.suffix == ".json").read_text())
    assert run["label"] == "smoke: not a measurement" and run["results"] == []
    assert (sorted(committed.iterdir()) if committed.is_dir() else []) == before


def test_side_by_side_time_ratios_are_paired_by_round():
    """Implementations timed side by side (round i of each in the same turn) report the median of the per-round time
    ratios, which a machine slowing down during the run leaves alone; others the ratio of the medians."""
    ratio = bench.Ratio("monitor", "exact", "off", "time", "exact / off step time", "lower")
    memory = bench.Ratio("monitor", "exact", "off", "memory", "exact / off peak memory", "lower")

    def result(impl, samples, side_by_side):
        return {"kind": "monitor", "shape": "s", "pass": "step", "impl": impl, "samples_ms": samples,
                "time_ms": sorted(samples)[len(samples) // 2], "peak_memory_bytes": 100 if impl == "off" else 120,
                "side_by_side": side_by_side}

    # The machine slows down 2x, 3x over the rounds; each round exact costs 1.1x off.
    off, exact = [10.0, 20.0, 30.0], [11.0, 22.0, 33.0]
    paired = bench.compute_ratios([result("off", off, True), result("exact", exact, True)], "ours-torch",
                                  [ratio, memory])
    assert abs(paired[0]["value"] - 1.1) < 1e-12, "the per-round ratio, whatever the drift"
    assert abs(paired[1]["value"] - 1.2) < 1e-12, "memory ratios stay ratios of the measurements"
    # Measured one after another: the ratio of the medians.
    apart = bench.compute_ratios([result("off", off, False), result("exact", [33.0, 33.0, 33.0], False)],
                                 "ours-torch", [ratio])
    assert abs(apart[0]["value"] - 33.0 / 20.0) < 1e-12

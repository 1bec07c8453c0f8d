"""The prepared GPU run (benchmarks/gpu_run.py), rehearsed on CPU: every step but the device calls."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_run_rehearsal(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--rehearse", "--out",
                           str(tmp_path), "--budget", "400"], cwd=ROOT, capture_output=True, text=True, timeout=450)
    records = list(tmp_path.glob("gpu-run-rehearsal-*.json"))
    assert len(records) == 1, proc.stdout + proc.stderr
    record = json.loads(records[0].read_text())
    assert [s["step"] for s in record["steps"]] == ["build", "tests", "benchmarks"], record
    for step in record["steps"]:
        assert step["returncode"] == 0, f"{step['step']} failed:\n{step['output_tail']}"
    assert record["ok"] and proc.returncode == 0
    import re

    collected = re.search(r"(\d+) tests collected", record["steps"][1]["output_tail"])
    assert collected and int(collected.group(1)) > 100, record["steps"][1]["output_tail"][-500:]
    assert record["environment"]["rehearsal"] and record["environment"]["torch"]
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.md")), "the benchmark step wrote no run"

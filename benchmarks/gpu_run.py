"""The project's one prepared GPU run: everything only a GPU can show, end to end, in one command.

    python benchmarks/gpu_run.py                 # on a machine with one CUDA GPU (about 8 minutes)
    python benchmarks/gpu_run.py --rehearse      # on CPU: every step but the device calls (the tests run this)

Steps, each timed, each with its own deadline inside ``--budget`` seconds:

1. environment: GPU name, driver, torch / triton / CUDA versions, into the run record;
2. build: the CUDA C++ extension of ``csrc/`` (just in time, ninja; ``MAX_JOBS`` from the CPU count);
3. tests: every test that needs a CUDA device (the CUDA kernels and the compiled Triton kernels against the float64
   references, bf16 included): ``tests/test_cuda.py``, ``tests/test_pair_wgrad.py``, ``tests/test_triton_logprob.py``,
   ``tests/test_token_stats.py``, ``tests/test_logprob_transforms.py``;
4. benchmarks: the ``gpu`` preset's headline cases (the fused op at the Llama-3-8B head shape, the token statistics,
   the monitor at a 1B-class model, the pair weight gradient), written to ``benchmarks/results/`` with the machine
   named.

The record ``benchmarks/results/gpu-run-<date>.json`` holds every step's command, exit code, duration and the tail
of its output, so a run that stops early still says how far it got. ``--rehearse`` runs the same plan on CPU: the
environment step, the extension's build settings without nvcc, test collection only, and the ``smoke`` benchmark
preset's monitor cases; it fails on anything but the missing GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_pair_wgrad.py", "tests/test_triton_logprob.py",
              "tests/test_token_stats.py", "tests/test_logprob_transforms.py"]
HEADLINE = "logprobs or token_stats or monitor"
# Seconds each step may take at most, as fractions of the budget (the benchmarks get what the others leave).
SHARES = {"environment": 0.05, "build": 0.25, "tests": 0.3, "benchmarks": 0.6}


def _environment(rehearse: bool) -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "cuda_available": torch.cuda.is_available(), "rehearsal": rehearse}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return env


def plan(rehearse: bool, out: Path) -> list[tuple[str, list[str]]]:
    """``[(step, command)]`` of the run (after the environment step, which runs in this process)."""
    py = sys.executable
    build = ("from entangle_fast import _cuda; print(_cuda._build_settings())" if rehearse
             else "from entangle_fast import _cuda; _cuda.load_extension(verbose=True); print('built')")
    tests = [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CUDA_TESTS]
    if rehearse:
        tests.append("--co")  # collection: the device calls are the tests themselves
    bench = [py, "-m", "entangle_fast", "bench", "--no-progress", "--out", str(out)]
    bench += ["--preset", "smoke", "-k", "monitor"] if rehearse else ["--preset", "gpu", "-k", HEADLINE]
    return [("build", [py, "-c", build]), ("tests", tests), ("benchmarks", bench)]


def run(rehearse: bool, out: Path, budget: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if not rehearse:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_run: no CUDA device is visible; --rehearse runs the plan on CPU")
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    record = {"kind": "gpu-run", "date": stamp, "environment": _environment(rehearse), "steps": []}
    path = out / f"gpu-run-{'rehearsal-' if rehearse else ''}{stamp}.json"
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    if rehearse:
        env.update({"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"})
    start = time.monotonic()
    ok = True
    for name, command in plan(rehearse, out):
        left = budget - (time.monotonic() - start)
        limit = max(10.0, min(left, SHARES[name] * budget))
        t0 = time.monotonic()
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            code, output = 124, f"timed out after {limit:.0f} s\n{err.stdout or ''}{err.stderr or ''}"
        step = {"step": name, "command": command, "returncode": code, "seconds": round(time.monotonic() - t0, 1),
                "output_tail": output[-4000:]}
        record["steps"].append(step)
        path.write_text(json.dumps(record, indent=1))
        print(f"[gpu_run] {name}: exit {code} in {step['seconds']} s", flush=True)
        if code != 0:
            ok = False
            break
    record["ok"] = ok
    path.write_text(json.dumps(record, indent=1))
    print(f"[gpu_run] record: {path}", flush=True)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rehearse", action="store_true", help="run the plan on CPU, without the device calls")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the record goes")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    args = parser.parse_args(argv)
    record = run(args.rehearse, Path(args.out), args.budget)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

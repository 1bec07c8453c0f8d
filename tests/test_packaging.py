"""The package installs from a built wheel, `entangle_fast.kernels` included (setup.py maps kernels/ onto it), and
`entangle-fast bench` finds its suites inside the installed package (setup.py maps benchmarks/ onto
`entangle_fast/benchmarks`)."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "README.md", "entangle_fast", "kernels", "csrc", "benchmarks"):
        path = ROOT / name
        copy = shutil.copytree if path.is_dir() else shutil.copy
        copy(path, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if path.is_dir() else {}))
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src))
    (whl,) = out.glob("entangle_fast-*.whl")
    return whl


def _install(wheel, tmp_path) -> tuple[Path, Path]:
    """``(python, site-packages)`` of a fresh venv holding the wheel alone."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # Install the wheel alone into the fresh environment; torch & co. come from this interpreter's site-packages,
    # appended after the venv's own (a .pth line adds a path without running the .pth files inside it, so an
    # editable install of the project there stays invisible).
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel))
    (site / "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py, site


def test_wheel_installs_into_fresh_venv_with_kernels(wheel, tmp_path):
    py, site = _install(wheel, tmp_path)
    probe = (
        "import entangle_fast, entangle_fast.kernels as k, pathlib;"
        "print(entangle_fast.__file__); print(k.__file__); print(k.HAS_TRITON);"
        "print(sorted(p.name for p in pathlib.Path(k.__file__).parent.glob('*.py')))"
    )
    lines = run(str(py), "-c", probe, cwd=tmp_path).splitlines()
    assert lines[0].startswith(str(site)), f"entangle_fast imported from {lines[0]}, not the fresh venv"
    assert lines[1].startswith(str(site / "entangle_fast" / "kernels")), lines[1]
    files = eval(lines[3])  # noqa: S307  (our own printed list)
    assert "logprob.py" in files, f"kernels/ files missing from the wheel: {files}"
    csrc = sorted(p.name for p in (site / "entangle_fast" / "csrc").glob("*"))
    assert {"logprob.cu", "ghost_gram.cu", "bindings.cpp"} <= set(csrc), f"CUDA sources missing from the wheel: {csrc}"


def test_console_script_declared(wheel):
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        entry = next(n for n in zf.namelist() if n.endswith("entry_points.txt"))
        assert "entangle-fast = entangle_fast.cli:main" in zf.read(entry).decode()


SUITES = {"conftest.py", "cases.py", "presets.py", "harness.py", "test_bench_logprobs.py", "test_bench_token_stats.py",
          "test_bench_monitor.py", "test_bench_trainer.py", "test_bench_profile.py"}


def test_wheel_ships_the_benchmark_suites_and_bench_runs_from_it(wheel, tmp_path):
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        shipped = {n.split("/")[-1] for n in zf.namelist() if n.startswith("entangle_fast/benchmarks/")}
        assert SUITES <= shipped, f"benchmark suites missing from the wheel: {sorted(SUITES - shipped)}"
        assert not any(n.startswith("entangle_fast/benchmarks/results/") for n in zf.namelist())
    py, site = _install(wheel, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    probe = "from entangle_fast import bench; print(bench.benchmarks_dir()); print(len(bench.suite_ratios()))"
    where, n_ratios = run(str(py), "-c", probe, cwd=tmp_path, env=env).split()
    assert where == str(site / "entangle_fast" / "benchmarks"), where
    assert int(n_ratios) > 0
    # The real command from the installed package, outside any checkout: one tiny case measured into the run file.
    run(str(py), "-m", "entangle_fast", "bench", "--preset", "smoke", "-k", "ceiling", "--no-progress",
        "--out", str(tmp_path / "out"), cwd=tmp_path, env=env)
    (run_file,) = (tmp_path / "out").glob("*.json")
    results = json.loads(run_file.read_text())["results"]
    assert [(r["kind"], r["impl"]) for r in results] == [("matmul", "matmul")], results

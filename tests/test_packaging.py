"""The package installs from a built wheel, `entangle_fast.kernels` included (setup.py maps kernels/ onto it)."""
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
    for name in ("setup.py", "README.md", "entangle_fast", "kernels", "csrc"):
        path = ROOT / name
        copy = shutil.copytree if path.is_dir() else shutil.copy
        copy(path, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if path.is_dir() else {}))
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src))
    (whl,) = out.glob("entangle_fast-*.whl")
    return whl


def test_wheel_installs_into_fresh_venv_with_kernels(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # Install the wheel alone into the fresh environment; torch & co. come from this interpreter's site-packages,
    # appended after the venv's own (a .pth line adds a path without running the .pth files inside it, so an
    # editable install of the project there stays invisible).
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel))
    (site / "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
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

"""Heat-maps of very short responses (1-2 tokens) keep their title, axis titles and colour-bar label inside the figure,
and the repository ignores the folders the commands write by default."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from entangle_fast import plots

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tw, tl", [(1, 1), (2, 2), (2, 7), (40, 3)])
def test_labels_of_small_heatmaps_are_not_clipped(tw, tl, tmp_path, monkeypatch):
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    torch.manual_seed(0)
    path = plots.token_heatmap(torch.randn(tw, tl), [f"tok{i}" for i in range(tw)], [f"word{j}" for j in range(tl)],
                               title="Output-layer token matrix K[t, s], set c pair 0, DPO step 0",
                               path=tmp_path / "k.png", cbar_label="<grad l_t(chosen), grad l_s(rejected)>")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    ax, cax = fig.axes
    texts = {"title": ax.title, "ylabel": ax.yaxis.label, "xlabel": ax.xaxis.label, "cbar label": cax.yaxis.label}
    for name, text in texts.items():
        ext = text.get_window_extent(renderer)
        inside = ext.x0 >= box.x0 - 1 and ext.y0 >= box.y0 - 1 and ext.x1 <= box.x1 + 1 and ext.y1 <= box.y1 + 1
        assert inside, f"{name} {text.get_text()!r} at {ext.bounds} leaves the figure {box.bounds} ([{tw}, {tl}])"


def test_default_output_folders_are_ignored():
    import argparse

    from entangle_fast.commands import profile

    if not (ROOT / ".git").exists():
        pytest.skip("requires_git_checkout: .gitignore is checked with git check-ignore")
    parser = argparse.ArgumentParser()
    profile.configure(parser)
    folders = [parser.get_default("out"), "entangle-bench", "entangle_demo"]
    assert folders[0] == "entangle-profile"
    for folder in folders:
        proc = subprocess.run(["git", "check-ignore", "-q", f"{folder}/x.json"], cwd=ROOT)
        assert proc.returncode == 0, f"{folder}/ is not in .gitignore"


def test_example_takes_the_flags_its_docstring_names(tmp_path):
    """examples/plain_pytorch_loop.py: every ``--flag`` its docstring mentions is accepted; ``--quiet`` prints nothing."""
    import os
    import re
    import sys

    script = ROOT / "examples" / "plain_pytorch_loop.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    usage = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
    assert usage.returncode == 0, usage.stderr
    documented = set(re.findall(r"--[a-z][a-z-]+", script.read_text().split('"""')[1]))
    assert documented >= {"--steps", "--quiet"} and all(flag in usage.stdout for flag in documented), documented
    quiet = subprocess.run([sys.executable, str(script), "--steps", "1", "--quiet"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=300)
    assert quiet.returncode == 0 and quiet.stdout == "", (quiet.stdout, quiet.stderr[-2000:])

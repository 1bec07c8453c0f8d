"""Every ```python block of README.md and docs/*.md runs as written, on CPU, in a fresh namespace.

A block that cannot run here (it needs a GPU, several processes, a download) is preceded by the marker line

    <!-- snippet: skip: <reason> -->

and is skipped with that reason, so a skip is always explicit and named. Each block runs in a scratch working
directory (files it writes land there) with one intra-op thread (tiny models run faster on one on a busy machine).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARKER = re.compile(r"^<!--\s*snippet:\s*skip:\s*(?P<reason>.+?)\s*-->$")
FENCE = re.compile(r"^```python\s*$")


def extract_snippets(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of every ```python block, ``line`` 1-based at the opening fence."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i].strip()):
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise ValueError(f"unclosed ```python block at line {start + 1}")
            before = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            marker = SKIP_MARKER.match(before)
            out.append((start + 1, "\n".join(lines[start + 1:j]) + "\n", marker["reason"] if marker else None))
            i = j + 1
        else:
            i += 1
    return out


def _cases():
    for doc in DOCUMENTS:
        for line, code, reason in extract_snippets(doc.read_text()):
            marks = [pytest.mark.skip(reason=f"snippet marked skip: {reason}")] if reason else []
            yield pytest.param(doc, line, code, id=f"{doc.relative_to(ROOT)}:{line}", marks=marks)


CASES = list(_cases())


def test_readme_has_snippets():
    assert any(str(c.values[0]).endswith("README.md") for c in CASES), "README.md has no ```python block"


@pytest.mark.parametrize("doc, line, code", CASES)
def test_snippet_runs(doc, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, f"{doc.name}:{line}", "exec"), {"__name__": "__snippet__"})
    finally:
        torch.set_num_threads(threads)


def test_extractor_reads_blocks_and_named_skips():
    text = ("intro\n```python\nx = 1\n```\n\n<!-- snippet: skip: needs a CUDA device -->\n\n```python\ny = 2\n```\n"
            "```bash\nls\n```\n")
    assert extract_snippets(text) == [(2, "x = 1\n", None), (8, "y = 2\n", "needs a CUDA device")]
    with pytest.raises(ValueError, match="unclosed"):
        extract_snippets("```python\nx = 1\n")

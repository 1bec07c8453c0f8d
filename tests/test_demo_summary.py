"""The demo prints one summary row per set and method by default, every step with ``full_table`` / ``--table``."""
from __future__ import annotations

import argparse

import pytest

from entangle_fast.commands import demo as demo_cmd
from entangle_fast.demo import METHODS, DemoConfig, run_demo

STEPS = 2


def _run(tmp_path, **kwargs):
    lines: list[str] = []
    result = run_demo(DemoConfig(steps=STEPS, out=str(tmp_path), progress=False, plots=False, **kwargs),
                      print_fn=lines.append)
    return result, lines


def _rows(lines):
    return [line.split() for line in lines if line.split()[:2] and line.split()[0] in ("a", "b", "c")
            and line.split()[1] in METHODS]


def test_default_output_is_one_row_per_set_and_method(tmp_path):
    result, lines = _run(tmp_path)
    rows = _rows(lines)
    assert [r[:3] for r in rows] == [[s, m, str(STEPS)] for s in "abc" for m in METHODS], lines
    assert len(lines) < 20, "\n".join(lines)
    for s, method, _, cos, dw, dl, dm, fell, cases, sign in rows:
        summary = result.log["summary"][s][method]
        for printed, key in ((cos, "cosine_mean"), (dw, "chosen_change"), (dl, "rejected_change"),
                             (dm, "margin_change")):
            assert float(printed) == pytest.approx(summary[key], abs=5e-4), (s, method, key)  # printed to 3 decimals
        assert fell == f"{summary['steps_chosen_fell']}/{STEPS}"
        assert cases == "/".join(str(summary["case_counts"][c]) for c in "123")
        assert float(sign.rstrip("%")) == pytest.approx(100 * summary["prediction_sign_agreement"], abs=0.5)
    assert any(line.startswith("Gradient cosine") for line in lines)  # the verdict follows


def test_full_table_prints_every_step(tmp_path):
    _, lines = _run(tmp_path, full_table=True)
    rows = _rows(lines)
    assert len(rows) == 3 * len(METHODS) * STEPS
    assert {r[2] for r in rows} == {str(k) for k in range(STEPS)}  # the step column
    assert any("dw pred" in line for line in lines)


@pytest.mark.parametrize("argv, full", [([], False), (["--table"], True)])
def test_cli_table_flag(argv, full, monkeypatch):
    seen = {}
    monkeypatch.setattr("entangle_fast.demo.run_demo", lambda config: seen.setdefault("config", config))
    parser = argparse.ArgumentParser()
    demo_cmd.configure(parser)
    assert demo_cmd.run(parser.parse_args(argv + ["--no-progress"])) == 0
    assert seen["config"].full_table is full
